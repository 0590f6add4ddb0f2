"""Take the shared float32 word-embedding table out of ONNX files (so it travels once), or put it back.

  splice.py out TABLE_SOURCE.safetensors TABLE_OUT FILE...   zero the table in each FILE, write TABLE_OUT and FILE.splice
  splice.py in TABLE FILE...                                 write the table back at FILE.splice's offset
"""
import json, struct, sys
mode = sys.argv[1]
if mode == "out":
    src, table_out, files = sys.argv[2], sys.argv[3], sys.argv[4:]
    raw = open(src, "rb").read()
    (hlen,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8:8 + hlen])
    meta = header["embeddings.word_embeddings.weight"]
    a, b = meta["data_offsets"]
    table = raw[8 + hlen + a:8 + hlen + b]
    open(table_out, "wb").write(table)
    for f in files:
        data = bytearray(open(f, "rb").read())
        i = data.find(table)
        if i < 0:
            print(f"{f}: table not found"); continue
        data[i:i + len(table)] = bytes(len(table))
        open(f, "wb").write(data)
        open(f + ".splice", "w").write(json.dumps({"offset": i, "length": len(table)}))
        print(f"{f}: table at {i}")
else:
    table = open(sys.argv[2], "rb").read()
    for f in sys.argv[3:]:
        s = json.load(open(f + ".splice"))
        assert s["length"] == len(table)
        with open(f, "r+b") as fh:
            fh.seek(s["offset"]); fh.write(table)
        print(f"{f}: table restored")
