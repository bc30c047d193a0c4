"""The node's mesh identity: a persisted X25519 key and the Talos-compatible mesh address.

Mesh address (exactly as Talos computes it):

* prefix: SHA-256 of the cluster id string, keep the last 16 bytes, set byte 0
  to ``0xfd`` and byte 7 to the purpose code (``0x02`` for KubeSpan), mask to
  /64;
* host part: the modified EUI-64 of a MAC address (insert ``ff:fe`` in the
  middle of a 48-bit MAC, flip the universal/local bit).

Talos takes the MAC of the first physical link (links sorted by name);
:func:`pick_mac` does the same and, where every link is virtual (network
namespaces), falls back to the first non-loopback link with a MAC.

The private key is generated once, written 0600 atomically (temporary file,
fsync, hard link into place so that a concurrent writer can never replace an
existing key, fsync of the directory) and reused on every later start. It is
stored as one base64 line, like ``wg genkey`` output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from kubespan.constants import IDENTITY_FILE, MESH_PREFIX_LEN, ULA_PURPOSE_KUBESPAN
from kubespan.wireguard.types import InvalidKeyError, PrivateKey, PublicKey


class IdentityError(Exception):
    """The identity cannot be loaded or derived (never carries key material)."""


# --- Mesh addressing -----------------------------------------------------------------------------


def ula_prefix(cluster_id: str, purpose: int = ULA_PURPOSE_KUBESPAN) -> IPv6Network:
    """The /64 ULA prefix Talos derives from a cluster id for ``purpose``."""
    if not 0 <= purpose <= 0xFF:
        raise ValueError(f"purpose: {purpose} must be 0..255")
    digest = bytearray(hashlib.sha256(cluster_id.encode("utf-8")).digest()[-16:])
    digest[0] = 0xFD
    digest[7] = purpose
    return IPv6Network((bytes(digest[:8]) + bytes(8), MESH_PREFIX_LEN))


def is_ula(addr: IPv4Address | IPv6Address, purpose: int) -> bool:
    """Talos' ``IsULA``: an IPv6 address whose byte 0 is 0xfd and byte 7 is ``purpose``."""
    if addr.version != 6:
        return False
    packed = addr.packed
    return packed[0] == 0xFD and packed[7] == purpose


def parse_mac(mac: bytes | str) -> bytes:
    """A MAC as bytes; text may use ``:`` or ``-`` separators. 6 or 8 bytes, not all zero."""
    if isinstance(mac, str):
        parts = mac.replace("-", ":").split(":")
        try:
            if not all(len(p) == 2 for p in parts):
                raise ValueError
            raw = bytes(int(p, 16) for p in parts)
        except ValueError:
            raise ValueError(f"mac: {mac!r} is not a MAC address") from None
    else:
        raw = bytes(mac)
    if len(raw) not in (6, 8):
        raise ValueError(f"mac: {len(raw)} bytes, need 6 (EUI-48) or 8 (EUI-64)")
    if not any(raw):
        raise ValueError("mac: all-zero MAC address")
    return raw


def eui64_interface_id(mac: bytes | str) -> bytes:
    """The 8-byte modified EUI-64 interface identifier of a MAC."""
    raw = parse_mac(mac)
    ident = bytearray(raw[:3] + b"\xff\xfe" + raw[3:]) if len(raw) == 6 else bytearray(raw)
    ident[0] ^= 0x02
    return bytes(ident)


def mesh_address(cluster_id: str, mac: bytes | str) -> IPv6Interface:
    """The node's mesh address with its /64, as Talos assigns it to the link."""
    prefix = ula_prefix(cluster_id)
    addr = IPv6Address(prefix.network_address.packed[:8] + eui64_interface_id(mac))
    return IPv6Interface((addr, MESH_PREFIX_LEN))


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What :func:`pick_mac` needs to know about a network link."""

    name: str
    mac: bytes | None
    physical: bool
    loopback: bool = False


def pick_mac(links: Iterable[LinkInfo]) -> bytes | None:
    """The first physical link's MAC by name; else the first non-loopback link with a MAC."""
    usable = sorted(
        (link for link in links if not link.loopback and link.mac and any(link.mac)),
        key=lambda link: link.name,
    )
    for link in usable:
        if link.physical:
            return link.mac
    return usable[0].mac if usable else None


# --- Keys ----------------------------------------------------------------------------------------


def generate_private_key() -> PrivateKey:
    """A fresh Curve25519 private key in WireGuard's clamped form."""
    raw = bytearray(
        X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    )
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return PrivateKey(bytes(raw))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key(path: Path) -> PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot open key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # tighten a key file someone loosened
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(4096)
    finally:
        os.close(fd)
    try:
        return PrivateKey.from_b64(data.decode("ascii"))
    except (UnicodeDecodeError, InvalidKeyError):
        raise IdentityError(f"{path}: key file is corrupt (expected one base64 32-byte key)") from None


def _write_key_exclusive(path: Path, key: PrivateKey) -> bool:
    """Atomically create ``path`` holding ``key``; False if it already exists (untouched)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key.b64 + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if a key already exists: never replace one
        created = True
    except FileExistsError:
        created = False
    finally:
        tmp.unlink()
    _fsync_dir(path.parent)
    return created


def load_or_create_private_key(
    state_dir: str | os.PathLike[str], filename: str = IDENTITY_FILE
) -> tuple[PrivateKey, bool]:
    """The persisted private key, generating and storing it on first use.

    Returns ``(key, created)``. The state directory is created 0700 if missing.
    A corrupt key file raises :class:`IdentityError` rather than being replaced,
    since a new key would silently change the node's identity.
    """
    directory = Path(state_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / filename
    if path.exists() or path.is_symlink():
        return _read_key(path), False
    if _write_key_exclusive(path, generate_private_key()):
        return _read_key(path), True
    return _read_key(path), False  # lost a race with another process: use its key


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    """The local mesh identity. ``repr`` never shows the private key."""

    private_key: PrivateKey
    public_key: PublicKey
    address: IPv6Interface  # mesh address with its /64

    @property
    def subnet(self) -> IPv6Network:
        return self.address.network

    @classmethod
    def derive(cls, private_key: PrivateKey, cluster_id: str, mac: bytes | str) -> MeshIdentity:
        return cls(private_key, private_key.public_key(), mesh_address(cluster_id, mac))

    def __repr__(self) -> str:
        return (
            f"MeshIdentity(public_key={self.public_key.b64}, address={self.address}, private_key=<redacted>)"
        )


def load_identity(
    state_dir: str | os.PathLike[str], cluster_id: str, mac: bytes | str, filename: str = IDENTITY_FILE
) -> MeshIdentity:
    """Load (or create) the key and derive the address; the address is recomputed every time."""
    key, _ = load_or_create_private_key(state_dir, filename)
    return MeshIdentity.derive(key, cluster_id, mac)
