#!/usr/bin/env python3
"""Writes a tiny ELF64 guest with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY).

The guest starts in 32-bit protected mode, optionally prints text on the 16550 UART at
0x3f8, then writes its exit value to the isa-debug-exit port 0xf4 (or, with --reset, resets
through the i8042). With --triple-fault it
instead loads an empty IDT and raises an exception, which escalates to a triple fault.

Used by the smoke tests (which run it directly on any KVM, even a software one) and by
resources/bench/boot.sh (which boots it under tapir and under QEMU microvm).
"""

import argparse
import struct

LOAD_ADDR = 0x100000
CODE_OFFSET = 0x100
XEN_ELFNOTE_PHYS32_ENTRY = 18


def code(exit_value: int, text: str, triple_fault: bool, reset: bool) -> bytes:
    out = bytearray()
    for ch in text.encode():
        out += b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
        out += bytes([0xB0, ch])    # mov al, ch
        out += b"\xee"              # out dx, al
    if triple_fault:
        # PVH entry gives no IDT worth the name (tapir's holds no valid gate), so the
        # invalid-opcode fault cannot be delivered: #UD -> #GP -> #DF -> shutdown.
        out += b"\x0f\x0b"      # ud2
        out += b"\xf4\xeb\xfd"  # hlt; jmp hlt
    elif reset:
        out += b"\xb0\xfe\xe6\x64"  # mov al, 0xfe; out 0x64, al (i8042 CPU reset)
        out += b"\xf4\xeb\xfd"
    else:
        out += bytes([0xB0, exit_value & 0xFF])  # mov al, exit_value
        out += b"\xe6\xf4"                       # out 0xf4, al
        out += b"\xf4\xeb\xfd"                   # hlt; jmp hlt
    return bytes(out)


def elf(body: bytes) -> bytes:
    entry = LOAD_ADDR + CODE_OFFSET
    phnum = 2
    ehdr_size, phdr_size = 64, 56
    note_off = ehdr_size + phnum * phdr_size
    note = struct.pack("<III", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\x00" + struct.pack("<I", entry)
    image = bytearray(CODE_OFFSET)
    image[note_off:note_off + len(note)] = note
    image += body
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\x00" * 8
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, ehdr_size, 0, 0,
                               ehdr_size, phdr_size, phnum, 64, 0, 0)
    pt_load = struct.pack("<IIQQQQQQ", 1, 5, 0, LOAD_ADDR, LOAD_ADDR, len(image), len(image), 0x1000)
    pt_note = struct.pack("<IIQQQQQQ", 4, 4, note_off, LOAD_ADDR + note_off, LOAD_ADDR + note_off,
                          len(note), len(note), 4)
    image[0:ehdr_size + 2 * phdr_size] = ehdr + pt_load + pt_note
    return bytes(image)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("output")
    p.add_argument("--exit-value", type=lambda v: int(v, 0), default=0x2A)
    p.add_argument("--serial", default="", help="text to print on ttyS0 first (\\n is a newline)")
    p.add_argument("--triple-fault", action="store_true")
    p.add_argument("--reset", action="store_true", help="pulse the i8042 reset line instead")
    a = p.parse_args()
    with open(a.output, "wb") as f:
        f.write(elf(code(a.exit_value, a.serial.replace("\\n", "\n"), a.triple_fault, a.reset)))


if __name__ == "__main__":
    main()
