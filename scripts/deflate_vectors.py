#!/usr/bin/env python3
"""Interoperability vectors for backend/src/deflate/codec.rs, from an independent
DEFLATE: CPython's zlib.

    python3 scripts/deflate_vectors.py            # Python -> muxgate vectors
    python3 scripts/deflate_vectors.py --check    # muxgate -> Python: inflate ours

Without arguments it prints, as Rust arrays, the payloads Python's zlib makes
for the tests' messages: each message compressed with
zlib.compressobj(level, zlib.DEFLATED, -bits), sync-flushed, and its trailing
00 00 ff ff removed when it has one (RFC 7692 §7.2.1). With --check it
inflates the payloads that muxgate's Deflater made (OURS below, copied from
the test module) with zlib.decompressobj(-bits) after appending 00 00 ff ff
(§7.2.2), and checks that each gives back its message.
"""

import sys
import zlib

TEXT = b"permessage-deflate compresses each message; the LZ77 window may carry over. " * 4
BINARY = bytes((i * 37 + 11) % 251 for i in range(100))
TAIL = b"\x00\x00\xff\xff"


def skewed(n):
    """n bytes of 'a' and 'b' from a 31-bit LCG: zlib codes them in a dynamic block."""
    x, out = 1, bytearray()
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(b"ab"[(x >> 16) & 1])
    return bytes(out)


SKEWED = skewed(300)

# (name, level, bits, context takeover, messages)
CASES = [
    ("PY_L6_W15_TAKEOVER", 6, 15, True, [TEXT, TEXT, b"", b"Hello"]),
    ("PY_L9_W9_NO_TAKEOVER", 9, 9, False, [TEXT, SKEWED]),
    ("PY_L9_W15_TAKEOVER", 9, 15, True, [SKEWED, SKEWED]),
    ("PY_L1_W12_TAKEOVER", 1, 12, True, [BINARY, TEXT, BINARY]),
    ("PY_L0_W15_TAKEOVER", 0, 15, True, [b"Hello", b"Hello"]),
]

# What muxgate's Deflater made; keep in step with OURS_* in codec.rs.
# name: (bits, messages, payloads as hex, context takeover)
OURS = {
    "OURS_L6_W15_TAKEOVER": (
        15,
        [TEXT, TEXT, b"", b"Hello"],
        [
            "2a482dca4d2d2e4e4c4fd54d494dcb492c495548cecf2d284a2d2e4e2d56484d4cce5080ca5b2b9464a42af844999b2b9467e6a5e4972be426562a24271615552ae497a516e929148c00b30000",
            "1af5632a49690200",
            "00",
            "f248cdc9c90700",
        ],
        True,
    ),
    "OURS_L1_W9_NO_TAKEOVER": (
        9,
        [SKEWED, TEXT],
        [
            "4a4c4c4a4a4a4a4c02d1200ce280e9c4a4a4c444a83884095206520716056b03892741142682004805440bc844100f4c27c2482803622e481f4409840f3208c4879a0c62829c06b103643a5802e436907a903b413a2082200bc0e68108900b20ca203e0029058b81d4838c032b02b905c2011901f213c836300d2620ba202ac06e494c0200",
            "2a482dca4d2d2e4e4c4fd54d494dcb492c495548cecf2d284a2d2e4e2d56484d4cce5080ca5b2b9464a42af844999b2b9467e6a5e4972be426562a24271615552ae497a516e9298c04b30000",
        ],
        False,
    ),
    "OURS_L9_W12_TAKEOVER": (
        12,
        [SKEWED, SKEWED, BINARY],
        [
            "544f810d002008ba15fe3f2287a0666d922026c00a1095215c092a09a8fed5fab65458ac4246b4d48df724c561bccda5cfdedc19b6a7ffb9d241991e798014077af2102b987dcee36ece07",
            "4a1c0d2ba2c30a00",
            "0064009bff0b30557a9fc4e913385d82a7ccf11b40658aafd4f923486d92b7dc062b50759abfe40e33587da2c7ec163b6085aacff41e43688db2d701264b7095badf092e53789dc2e711365b80a5caef193e6388add2f721466b90b5da04294e7398bde20c31567ba000",
        ],
        True,
    ),
}


def compress(level, bits, takeover, messages):
    payloads = []
    comp = None
    for message in messages:
        if comp is None or not takeover:
            comp = zlib.compressobj(level, zlib.DEFLATED, -bits)
        data = comp.compress(message) + comp.flush(zlib.Z_SYNC_FLUSH)
        if data.endswith(TAIL):
            data = data[: -len(TAIL)]
        payloads.append(data)
    return payloads


def rust_array(payload):
    return "&[" + ", ".join(f"0x{b:02x}" for b in payload) + "]"


def main():
    if sys.argv[1:] == ["--check"]:
        if not OURS:
            sys.exit("paste OURS from the test module first")
        for name, (bits, messages, payloads, takeover) in OURS.items():
            decomp = zlib.decompressobj(-bits)
            for message, payload in zip(messages, payloads, strict=True):
                if not takeover:
                    decomp = zlib.decompressobj(-bits)
                try:
                    got = decomp.decompress(bytes.fromhex(payload) + TAIL)
                except zlib.error as err:
                    sys.exit(f"{name}: {err}")
                if got != message:
                    sys.exit(f"{name}: got {got[:40]!r}..., not {message[:40]!r}...")
            print(f"{name}: Python inflates all {len(payloads)} messages")
        return
    for name, level, bits, takeover, messages in CASES:
        payloads = compress(level, bits, takeover, messages)
        print(f"const {name}: &[&[u8]] = &[")
        for payload in payloads:
            print(f"    {rust_array(payload)},")
        print("];")


if __name__ == "__main__":
    main()
