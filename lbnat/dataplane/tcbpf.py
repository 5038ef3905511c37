"""The tc eBPF fast path's I/O (issue 17): load lbnat/bpf/fastpath.bpf.o, attach it to a
device's clsact ingress, detach it, and work its flow maps (IPv4's and IPv6's). The entry
layouts and the decisions (what to offload, when to withdraw) are lbnat.fastpath's; this module
only moves bytes.

libbpf through ctypes: no Python library loads a BPF ELF object here (pyroute2 attaches by fd
but cannot load an ELF; bcc wants kernel headers this kernel does not have), and libbpf does the
ELF relocation, BTF map creation and tc netlink for us. libbpf 1.x returns -errno from every
call (and NULL + errno from constructors); its messages go through libbpf_set_print, which we
point at a capture so a failure becomes `OffloadUnavailable` with the kernel's reason (the
verifier's error lines) instead of noise on stderr.

The struct layouts below are libbpf 1.1's (<bpf/libbpf.h>, <bpf/bpf.h>), `sz` first: libbpf
checks that the fields past what it knows are zero, so a bigger struct from a newer header is
refused rather than misread.

Attachment: a filter with a fixed handle and priority on clsact ingress, so a filter left by a
killed lbnat is found (`detach_stale`) or replaced (BPF_TC_F_REPLACE). No bpffs pin: the main
process holds the program and map fds, workers inherit the map fds (`FlowMap` works on any fd
of either map). The program refers to both maps, so a filter left attached (a hitless restart)
keeps both alive, and its removal (`lbnat cleanup`, the next lbnat's replacement) frees both.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

PROGRAM_NAME = "lbnat_fastpath"
MAP_NAME = "lbnat_flows"
KEY_SIZE = 16  # struct flow_key, lbnat/bpf/fastpath.bpf.c
VALUE_SIZE = 64  # struct flow_value
MAP6_NAME = "lbnat_flows6"  # IPv6 flows (issue 21)
KEY6_SIZE = 40  # struct flow_key6
VALUE6_SIZE = 88  # struct flow_value6
LAYOUTS = ((KEY_SIZE, VALUE_SIZE), (KEY6_SIZE, VALUE6_SIZE))  # what a FlowMap accepts
TC_HANDLE = 0x1B
TC_PRIORITY = 0xB1
TC_ACT_UNSPEC = -1  # "not mine": the next filter of the chain runs (another lbnat's), then on up
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
OBJECT_ENV = "LBNAT_BPF_OBJECT"

_BPF_TC_INGRESS = 1 << 0  # enum bpf_tc_attach_point
_BPF_TC_EGRESS = 1 << 1
_BPF_TC_F_REPLACE = 1 << 0  # enum bpf_tc_flags
_BPF_ANY = 0
_BPF_F_TEST_SKB_CHECKSUM_COMPLETE = 1 << 2  # <linux/bpf.h>, kernel 6.17 and later
_MAP_FULL = (errno.E2BIG, errno.ENOMEM)  # a hash map at max_entries; no memory for an element
_GONE = (errno.ENOENT, errno.ENODEV, errno.EINVAL)  # no such filter, device or qdisc
_LOG_BUFFER = 1 << 20  # one libbpf message (the verifier log is one message)
_LIBBPF_WARN = 0  # enum libbpf_print_level: WARN, INFO, DEBUG


class OffloadUnavailable(Exception):
    """The fast path cannot be used; str() is a one-line reason for a human."""


def object_path() -> Path:
    """The BPF object to load: $LBNAT_BPF_OBJECT, else fastpath.bpf.o beside its source."""
    override = os.environ.get(OBJECT_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "bpf" / "fastpath.bpf.o"


# --- libbpf's structs (libbpf 1.1) ----------------------------------------------------------


class _TcHook(ctypes.Structure):  # struct bpf_tc_hook: 24 bytes
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):  # struct bpf_tc_opts: 32 bytes
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


class _TestRunOpts(ctypes.Structure):  # struct bpf_test_run_opts: 80 bytes
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):  # the head of the kernel's struct bpf_map_info
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def _tc_hook(ifindex: int, attach_point: int = _BPF_TC_INGRESS) -> _TcHook:
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=attach_point)


def _tc_ours(prog_fd: int = 0, flags: int = 0, handle: int = TC_HANDLE) -> _TcOpts:
    return _TcOpts(
        sz=ctypes.sizeof(_TcOpts),
        prog_fd=prog_fd,
        flags=flags,
        handle=handle,
        priority=TC_PRIORITY,
    )


# --- loading libbpf, capturing its messages -------------------------------------------------

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_V = ctypes.c_void_p
_I = ctypes.c_int
_SIGNATURES: dict[str, tuple[type, list[type]]] = {
    "libbpf_set_print": (_V, [_PRINT_FN]),
    "bpf_object__open_file": (_V, [ctypes.c_char_p, _V]),
    "bpf_object__find_map_by_name": (_V, [_V, ctypes.c_char_p]),
    "bpf_object__find_program_by_name": (_V, [_V, ctypes.c_char_p]),
    "bpf_map__set_max_entries": (_I, [_V, ctypes.c_uint32]),
    "bpf_object__load": (_I, [_V]),
    "bpf_object__close": (None, [_V]),  # type: ignore[dict-item]
    "bpf_program__fd": (_I, [_V]),
    "bpf_map__fd": (_I, [_V]),
    "bpf_tc_hook_create": (_I, [_V]),
    "bpf_tc_hook_destroy": (_I, [_V]),
    "bpf_tc_attach": (_I, [_V, _V]),
    "bpf_tc_detach": (_I, [_V, _V]),
    "bpf_prog_test_run_opts": (_I, [_I, _V]),
    "bpf_map_update_elem": (_I, [_I, _V, _V, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (_I, [_I, _V, _V]),
    "bpf_map_delete_elem": (_I, [_I, _V]),
    "bpf_map_get_next_key": (_I, [_I, _V, _V]),
    "bpf_obj_get_info_by_fd": (_I, [_I, _V, ctypes.POINTER(ctypes.c_uint32)]),
}

_lock = threading.Lock()  # libbpf's print hook is process-wide: one capture at a time
_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_captured: list[tuple[int, str]] | None = None
_print_buffer: ctypes.Array[ctypes.c_char] | None = None


def _on_print(level: int, fmt: bytes | None, args: int | None) -> int:
    """libbpf's print hook: format the message into the current capture, or drop it."""
    global _print_buffer
    try:
        if _captured is not None and fmt is not None:
            if _print_buffer is None:
                _print_buffer = ctypes.create_string_buffer(_LOG_BUFFER)
            # A va_list is consumed once: one vsnprintf into a buffer big enough for a
            # verifier log of this program (a longer message is cut, its end lost).
            _libc.vsnprintf(_print_buffer, _LOG_BUFFER, fmt, args)
            _captured.append((level, _print_buffer.value.decode(errors="replace")))
    except Exception:  # an exception must not cross back into C
        pass
    return 0


_print_hook = _PRINT_FN(_on_print)  # kept alive for the life of the process


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as error:
            raise OffloadUnavailable(
                f"libbpf.so.1 not found ({error}): apt-get install libbpf1"
            ) from None
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
        lib.libbpf_set_print(_print_hook)
        _lib = lib
    return _lib


@contextmanager
def _capture() -> Iterator[list[tuple[int, str]]]:
    """libbpf's messages during the block: (level, text), one per message."""
    global _captured
    lines: list[tuple[int, str]] = []
    with _lock:
        _captured = lines
        try:
            yield lines
        finally:
            _captured = None


def _why(code: int, messages: list[tuple[int, str]]) -> str:
    """An error as text, with libbpf's last warning about it (a netlink extack, say)."""
    # libbpf's own codes (4000 and up, LIBBPF_ERRNO__*) are not errnos; its warning says it.
    text = "" if code >= 4000 else f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
    said = [
        line.removeprefix("libbpf: ").strip()
        for level, message in messages
        if level == _LIBBPF_WARN
        for line in message.splitlines()
        if line.strip() and not line.startswith("libbpf: failed to load object")
    ]
    if not said:
        return text or f"libbpf error {code}"
    return f"{text}: {said[-1]}" if text else said[-1]


def _verifier_error(messages: list[tuple[int, str]], limit: int = 3) -> str:
    """The verifier's own error: the last lines of its log before the statistics, without the
    register states it annotates instructions with."""
    log: list[str] = []
    for _, message in messages:
        if "-- BEGIN PROG LOAD LOG --" in message:
            body = message.split("-- BEGIN PROG LOAD LOG --", 1)[1]
            log = body.split("-- END PROG LOAD LOG --", 1)[0].splitlines()
    lines = [line.split(" ; ", 1)[0].strip() for line in log if line.strip()]
    while lines and lines[-1].startswith(("processed ", "verification time", "stack depth")):
        lines.pop()
    return " | ".join(lines[-limit:])


def _load_refused(code: int, messages: list[tuple[int, str]]) -> OffloadUnavailable:
    if code == errno.ENOSYS:
        return OffloadUnavailable("this kernel has no BPF (the bpf() system call: ENOSYS)")
    if code == errno.EPERM and os.geteuid() != 0:
        return OffloadUnavailable("loading a BPF program needs root (CAP_BPF, CAP_NET_ADMIN)")
    verifier = _verifier_error(messages)
    if verifier:
        return OffloadUnavailable(
            f"the kernel refused {PROGRAM_NAME} ({errno.errorcode.get(code, code)}): {verifier}"
        )
    return OffloadUnavailable(f"loading {PROGRAM_NAME} failed: {_why(code, messages)}")


# --- the program ----------------------------------------------------------------------------


class TcProgram:
    """The loaded program and its maps, IPv4 and IPv6 flows (the fds owned by libbpf's
    bpf_object), attached to at most one device's clsact ingress at a time."""

    def __init__(self, lib: ctypes.CDLL, obj: int, prog_fd: int, map_fd: int, map6_fd: int) -> None:
        self._lib = lib
        self._obj: int | None = obj
        self._prog_fd = prog_fd
        self._map_fd = map_fd
        self._map6_fd = map6_fd
        self._attached: tuple[int, bool] | None = None  # (ifindex, clsact created by us)
        self._handle = TC_HANDLE  # of the filter attached

    @classmethod
    def load(cls, path: Path, max_entries: int) -> TcProgram:
        """Open the object, size both maps (`max_entries` each) and load it all into the
        kernel."""
        if not path.is_file():
            raise OffloadUnavailable(f"no BPF object at {path} (build it with `make bpf`)")
        lib = _libbpf()
        with _capture() as messages:
            obj = lib.bpf_object__open_file(os.fsencode(path), None)
            if not obj:
                code = ctypes.get_errno()
                raise OffloadUnavailable(f"cannot open {path}: {_why(code, messages)}")
            try:
                prog = lib.bpf_object__find_program_by_name(obj, PROGRAM_NAME.encode())
                flows = lib.bpf_object__find_map_by_name(obj, MAP_NAME.encode())
                flows6 = lib.bpf_object__find_map_by_name(obj, MAP6_NAME.encode())
                if not prog or not flows or not flows6:
                    raise OffloadUnavailable(
                        f"{path} has no {PROGRAM_NAME}, {MAP_NAME} or {MAP6_NAME}"
                    )
                for flow_map in (flows, flows6):
                    code = -int(lib.bpf_map__set_max_entries(flow_map, max_entries))
                    if code:
                        raise OffloadUnavailable(
                            f"max_entries {max_entries} refused: {_why(code, messages)}"
                        )
                code = -int(lib.bpf_object__load(obj))
                if code:
                    raise _load_refused(code, messages)
                prog_fd = int(lib.bpf_program__fd(prog))
                map_fd = int(lib.bpf_map__fd(flows))
                map6_fd = int(lib.bpf_map__fd(flows6))
            except BaseException:
                lib.bpf_object__close(obj)
                raise
        return cls(lib, obj, prog_fd, map_fd, map6_fd)

    @property
    def prog_fd(self) -> int:
        self._check_open()
        return self._prog_fd

    @property
    def map_fd(self) -> int:
        """The IPv4 flows' map (lbnat_flows)."""
        self._check_open()
        return self._map_fd

    @property
    def map6_fd(self) -> int:
        """The IPv6 flows' map (lbnat_flows6)."""
        self._check_open()
        return self._map6_fd

    @property
    def attached_to(self) -> int | None:
        """The ifindex the program is attached to, or None."""
        return None if self._attached is None else self._attached[0]

    def attach(self, ifindex: int, handle: int = TC_HANDLE) -> None:
        """Attach to `ifindex`'s clsact ingress (creating clsact if absent), replacing a filter
        with this handle and our priority; moves the program if it was attached elsewhere.
        Several lbnat on one interface (one address each) attach with handles of their own:
        each program passes what is not its own on to the next (TC_ACT_UNSPEC)."""
        self._check_open()
        if self._attached is not None and self._attached[0] != ifindex:
            self.detach()
        hook = _tc_hook(ifindex)
        with _capture() as messages:
            code = -int(self._lib.bpf_tc_hook_create(ctypes.byref(hook)))
            if code not in (0, errno.EEXIST):  # EEXIST: someone's clsact, not ours to remove
                raise OffloadUnavailable(
                    f"cannot add a clsact qdisc to ifindex {ifindex}: {_why(code, messages)}"
                )
            created = code == 0 or (self._attached is not None and self._attached[1])
            opts = _tc_ours(self._prog_fd, _BPF_TC_F_REPLACE, handle)
            code = -int(self._lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)))
            if code:
                if created:
                    self._destroy_clsact(ifindex)
                self._attached = None
                raise OffloadUnavailable(
                    f"cannot attach {PROGRAM_NAME} to ifindex {ifindex}: {_why(code, messages)}"
                )
        self._attached = (ifindex, created)
        self._handle = handle

    def detach(self) -> None:
        """Remove our filter, and the clsact qdisc if we created it. Idempotent; a device that
        vanished meanwhile (and took both with it) is not an error."""
        if self._attached is None:
            return
        ifindex, created = self._attached
        self._attached = None
        hook = _tc_hook(ifindex)
        with _capture() as messages:
            opts = _tc_ours(handle=self._handle)
            code = -int(self._lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts)))
            if code and code not in _GONE:
                raise OffloadUnavailable(
                    f"cannot detach {PROGRAM_NAME} from ifindex {ifindex}: {_why(code, messages)}"
                )
        if created:
            self._destroy_clsact(ifindex)

    def _destroy_clsact(self, ifindex: int) -> None:
        # INGRESS | EGRESS deletes the qdisc itself; INGRESS alone would flush every ingress
        # filter on the device, other people's included.
        hook = _tc_hook(ifindex, _BPF_TC_INGRESS | _BPF_TC_EGRESS)
        with _capture() as messages:
            code = -int(self._lib.bpf_tc_hook_destroy(ctypes.byref(hook)))
            if code and code not in _GONE:
                raise OffloadUnavailable(
                    f"cannot remove the clsact qdisc of ifindex {ifindex}: {_why(code, messages)}"
                )

    def test_run(self, frame: bytes, checksum_complete: bool = False) -> tuple[int, bytes]:
        """BPF_PROG_TEST_RUN: run the program once on `frame` (Ethernet first); (its return
        value, the frame as the program left it). The maps are the real ones.
        `checksum_complete`: the skb is CHECKSUM_COMPLETE (skb->csum the sum of the packet
        after the Ethernet header), and the kernel checks that the program left skb->csum
        matching the packet (OSError EBADMSG if not)."""
        self._check_open()
        data_in = ctypes.create_string_buffer(frame, len(frame))
        data_out = ctypes.create_string_buffer(len(frame) + 256)
        opts = _TestRunOpts(
            sz=ctypes.sizeof(_TestRunOpts),
            data_in=ctypes.cast(data_in, ctypes.c_void_p),
            data_out=ctypes.cast(data_out, ctypes.c_void_p),
            data_size_in=len(frame),
            data_size_out=len(data_out),
            repeat=1,
            flags=_BPF_F_TEST_SKB_CHECKSUM_COMPLETE if checksum_complete else 0,
        )
        code = -int(self._lib.bpf_prog_test_run_opts(self._prog_fd, ctypes.byref(opts)))
        if code:
            raise OSError(code, f"BPF_PROG_TEST_RUN: {os.strerror(code)}")
        retval = ctypes.c_int32(opts.retval).value  # TC_ACT_UNSPEC is -1
        return retval, data_out.raw[: opts.data_size_out]

    def close(self) -> None:
        """Detach, then close the object (its program and map fds). Idempotent. The map lives
        on while another fd (a FlowMap, a worker's inherited copy) refers to it."""
        if self._obj is None:
            return
        try:
            self.detach()
        finally:
            self.release()

    def release(self) -> None:
        """Close the object but leave the filter attached: the kernel keeps the program (and
        its two maps, which the program holds) as long as the filter is there, so the flows in the
        map go on being rewritten after lbnat exits (a hitless restart: the next lbnat
        replaces the filter, `lbnat cleanup` or detach_stale removes it). Idempotent."""
        if self._obj is None:
            return
        self._attached = None
        self._lib.bpf_object__close(self._obj)
        self._obj = None

    def _check_open(self) -> None:
        if self._obj is None:
            raise ValueError("the TcProgram is closed")

    def __enter__(self) -> TcProgram:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def detach_stale(ifindex: int, handle: int = TC_HANDLE) -> bool:
    """Remove a filter with our handle and priority from `ifindex`'s clsact ingress (left by a
    killed lbnat); True if there was one. A clsact qdisc it left stays: it may not be ours."""
    lib = _libbpf()
    hook = _tc_hook(ifindex)
    with _capture() as messages:
        code = -int(lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(_tc_ours(handle=handle))))
        if code and code not in _GONE:
            raise OffloadUnavailable(
                f"cannot remove a stale filter from ifindex {ifindex}: {_why(code, messages)}"
            )
    return code == 0


# --- the map --------------------------------------------------------------------------------


class FlowMap:
    """A flow map by fd, IPv4's or IPv6's (the main process's, or one a worker inherited).
    Works on its own duplicate of the fd: close() closes that copy, the caller keeps and closes
    `fd`.

    Keys and values are the raw bytes lbnat.fastpath packs: KEY_SIZE and VALUE_SIZE for
    lbnat_flows, KEY6_SIZE and VALUE6_SIZE for lbnat_flows6 (`key_size`, `value_size` say
    which this one is). Each call is one bpf() system call on preallocated ctypes buffers (so
    one FlowMap per thread)."""

    def __init__(self, fd: int) -> None:
        lib = _libbpf()
        try:  # BPF_OBJ_GET_INFO_BY_FD fills a program's info just as happily
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as error:
            raise OSError(error.errno, f"fd {fd}: {error.strerror}") from None
        if kind != "anon_inode:bpf-map":
            raise OSError(errno.EINVAL, f"fd {fd} is not a BPF map but {kind}")
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        code = -int(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)))
        if code:
            raise OSError(code, f"fd {fd} is not a BPF map: {os.strerror(code)}")
        if (info.key_size, info.value_size) not in LAYOUTS:
            raise ValueError(
                f"map {info.name.decode()!r} has {info.key_size}-byte keys and "
                f"{info.value_size}-byte values, not {KEY_SIZE} and {VALUE_SIZE} "
                f"(nor {KEY6_SIZE} and {VALUE6_SIZE})"
            )
        self.key_size = int(info.key_size)
        self.value_size = int(info.value_size)
        self.max_entries = int(info.max_entries)
        self._fd = os.dup(fd)
        self._update = lib.bpf_map_update_elem
        self._lookup = lib.bpf_map_lookup_elem
        self._delete = lib.bpf_map_delete_elem
        self._next_key = lib.bpf_map_get_next_key
        self._value = ctypes.create_string_buffer(self.value_size)
        self._key = ctypes.create_string_buffer(self.key_size)

    @property
    def fd(self) -> int:
        return self._fd

    def put(self, key: bytes, value: bytes) -> bool:
        """Insert or replace; False when the map is full (or the kernel has no memory)."""
        # The kernel reads the map's key and value sizes from these pointers: check first.
        if len(key) != self.key_size or len(value) != self.value_size:
            raise ValueError(f"a key is {self.key_size} bytes and a value {self.value_size}")
        code = -int(self._update(self._fd, key, value, _BPF_ANY))
        if code:
            if code in _MAP_FULL:
                return False
            raise OSError(code, f"bpf_map_update_elem: {os.strerror(code)}")
        return True

    def get(self, key: bytes) -> bytes | None:
        """The value (counters as the kernel last wrote them), or None."""
        if len(key) != self.key_size:
            raise ValueError(f"a key is {self.key_size} bytes")
        code = -int(self._lookup(self._fd, key, self._value))
        if code:
            if code == errno.ENOENT:
                return None
            raise OSError(code, f"bpf_map_lookup_elem: {os.strerror(code)}")
        return self._value.raw

    def delete(self, key: bytes) -> None:
        """Remove the entry; an absent one is fine."""
        if len(key) != self.key_size:
            raise ValueError(f"a key is {self.key_size} bytes")
        code = -int(self._delete(self._fd, key))
        if code and code != errno.ENOENT:
            raise OSError(code, f"bpf_map_delete_elem: {os.strerror(code)}")

    def keys(self) -> list[bytes]:
        """Every key (a snapshot: entries added or removed meanwhile may be missed)."""
        found: list[bytes] = []
        previous: bytes | None = None
        while True:
            code = -int(self._next_key(self._fd, previous, self._key))
            if code == errno.ENOENT:
                return found
            if code:
                raise OSError(code, f"bpf_map_get_next_key: {os.strerror(code)}")
            previous = self._key.raw
            found.append(previous)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
