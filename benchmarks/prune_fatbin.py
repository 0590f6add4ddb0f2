"""Zero the device-code payloads a sm_90 GPU never loads, so the library compresses small.

For every fatbin container in a shared library: when it holds an ELF (SASS)
entry for the kept architecture, every other entry's payload is zeroed
(headers kept, so offsets and sizes are unchanged). Fatbins without such an
entry are left untouched.
"""
import struct, sys
MAGIC = b"\x50\xed\x55\xba"
keep = int(sys.argv[3]) if len(sys.argv) > 3 else 90
data = bytearray(open(sys.argv[1], "rb").read())
pos = 0; fat = kept = zeroed = untouched = 0
while True:
    i = data.find(MAGIC, pos)
    if i < 0: break
    version, hsize, fsize = struct.unpack_from("<HHQ", data, i + 4)
    if version != 1 or hsize != 16 or fsize == 0 or i + 16 + fsize > len(data):
        pos = i + 4; continue
    entries = []; e = i + 16; end = i + 16 + fsize; ok = True
    while e < end:
        kind, _, ehs, size = struct.unpack_from("<HHIQ", data, e)
        if kind not in (1, 2) or ehs < 64 or e + ehs + size > end: ok = False; break
        arch = struct.unpack_from("<I", data, e + 28)[0]
        entries.append((kind, arch, e + ehs, size)); e += ehs + size
    if not ok: pos = i + 4; continue
    fat += 1
    if any(k == 2 and a == keep for k, a, _, _ in entries):
        for k, a, off, size in entries:
            if k == 2 and a == keep: kept += size
            else: data[off:off + size] = bytes(size); zeroed += size
    else:
        untouched += 1
    pos = end
open(sys.argv[2], "wb").write(data)
print(f"fatbins {fat}, untouched {untouched}, kept {kept/1e6:.1f} MB, zeroed {zeroed/1e6:.1f} MB")
