"""Where compiled code may come from: the kernel cache directory and the key
of its sidecars, checked before anything in them is trusted.

- the directory must be owned by this user and writable by nobody else,
  otherwise it is refused (said once on stderr) and this process builds in a
  private temporary directory (`cache_dir`, `private_dir`);
- the sidecar (`KEY.hmac`) of an entry is an HMAC of the entry key and the
  library bytes under a per-user secret (`secret_key`: `$PASSLAB_KEY_FILE`,
  default `~/.config/passlab/cache.key`, 0600 in a 0700 directory), so whoever
  can write a library and a matching plain hash still cannot make it load
  (`entry_mac`, `verified_entry`);
- files are written whole or not at all (`atomic_write`).
"""
from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import secrets
import shutil
import stat
import sys
import tempfile

def warn_once(msg: str, _said: set = set()) -> None:
    if msg not in _said:
        _said.add(msg)
        print(f"passlab: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- where code may come from

_PRIVATE: list[str] = []


def private_dir() -> str:
    """This process's own directory (0700, removed at exit): loaded library
    copies, and the cache when the configured one is refused."""
    if not _PRIVATE:
        d = tempfile.mkdtemp(prefix="passlab-")
        atexit.register(shutil.rmtree, d, True)
        _PRIVATE.append(d)
    return _PRIVATE[0]


def untrusted(path: str, private: bool = False) -> str | None:
    """Why code from `path` cannot be trusted (None when it can): it must be
    owned by this user and writable by nobody else (`private`: nor readable)."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    bad = st.st_mode & (0o077 if private else 0o022)
    if bad:
        who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if bad & bits)
        return f"its mode {stat.filemode(st.st_mode)} lets {who} {'write' if bad & 0o022 else 'read'} it"
    return None


def cache_dir() -> str:
    """The kernel cache directory: $PASSLAB_CACHE or ~/.cache/passlab when
    it is trusted (see `untrusted`), else a private temporary one."""
    want = os.environ.get("PASSLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "passlab")
    try:
        os.makedirs(want, mode=0o700, exist_ok=True)
        why = untrusted(want)
    except OSError as e:
        why = f"it cannot be used ({e.strerror})"
    if why is None:
        return want
    d = os.path.join(private_dir(), "cache")
    os.makedirs(d, mode=0o700, exist_ok=True)
    warn_once(f"not using the cache directory {want}: {why}. Building in the private temporary directory "
              f"{d} instead (fix: `chmod go-w {want}` or `chown` it, or set PASSLAB_CACHE to a directory you own)")
    return d


_KEYS: dict[str, bytes] = {}


def secret_key() -> bytes:
    """The per-user key of the cache sidecars' HMACs, made on first use."""
    path = os.environ.get("PASSLAB_KEY_FILE") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"), "passlab", "cache.key")
    if path in _KEYS:
        return _KEYS[path]
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        why = untrusted(os.path.dirname(path))
        if why is None and not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")   # mode 0600
            try:
                os.write(fd, secrets.token_bytes(32))
                os.close(fd)
                try:
                    os.link(tmp, path)        # never replaces the key another process made meanwhile
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
        why = why or untrusted(path, private=True)
        if why is None:
            with open(path, "rb") as f:
                key = f.read()
            why = None if len(key) >= 32 else "it is shorter than 32 bytes"
    except OSError as e:
        why = f"it cannot be used ({e.strerror})"
    if why is not None:
        warn_once(f"not using the cache key {path}: {why}. Cache entries are trusted only within this process "
                  f"(fix: remove it, or set PASSLAB_KEY_FILE to a file of yours)")
        key = secrets.token_bytes(32)
    _KEYS[path] = key
    return key


def entry_mac(so: str, data: bytes) -> str:
    """The sidecar of cache entry `so`: an HMAC of its name (the key) and bytes."""
    name = os.path.basename(so).encode()
    return hmac.new(secret_key(), name + b"\0" + data, hashlib.sha256).hexdigest()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


UMASK = os.umask(0o22)
os.umask(UMASK)


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `path` as a whole or not at all: a temporary file in the same
    directory, renamed into place (removed if anything fails)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise



def entry_paths(d: str, h: str) -> tuple[str, str]:
    base = os.path.join(d, h[:32])
    return base + ".so", base + ".hmac"


def verified_entry(so: str, sig: str) -> bytes | None:
    """The library's bytes when its sidecar holds their HMAC under our key."""
    try:
        with open(sig) as f:
            want = f.read().strip()
        with open(so, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if hmac.compare_digest(entry_mac(so, data), want) else None
