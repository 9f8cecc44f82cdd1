"""A FUSE file system that answers INIT and then never again: what a container with /dev/fuse
and CAP_SYS_ADMIN can mount to stall whoever reads it. Speaks /dev/fuse directly (no library).

    python hangfs.py MOUNTPOINT   # prints "mounted", then one "request OPCODE" line per request

Killing it closes the device, which aborts the connection: every waiting request fails (ENOTCONN).
"""
import ctypes
import os
import struct
import sys

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write, time_gran,
# max_pages, map_alignment, flags2, max_stack_depth, unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
FUSE_INIT = 26


def main() -> None:
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"hangfs", sys.argv[1].encode(), b"fuse.hangfs", 0, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount: {os.strerror(err)}")
    print("mounted", flush=True)
    while True:
        request = os.read(fd, 1 << 21)
        _, opcode, unique = IN_HEADER.unpack_from(request)[:3]
        if opcode == FUSE_INIT:
            major, minor = struct.unpack_from("<II", request, IN_HEADER.size)
            body = INIT_OUT.pack(7, min(minor, 31), 0, 0, 16, 12, 1 << 16, 1, 0, 0, 0, 0)
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body)
        else:
            print("request", opcode, flush=True)  # and never an answer


if __name__ == "__main__":
    main()
