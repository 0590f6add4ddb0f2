"""Prototype of least-squares reconstruction (PyTorch), used to choose the
settings of `reconstruct:` before the Rust version existed: re-fits each
narrowed MLP's output projection of a pruned MiniLM to the full MLP's output
on random SciFact abstracts, then scores SciFact test and Cranfield.

    python3 benchmarks/reconstruct_prototype.py PRUNED_DIR N_ABSTRACTS RIDGE [--base] [--oneshot]

--oneshot fits every layer from one pass of the unrepaired model instead of
layer by layer; --base also scores the model before the re-fit.
"""
import sys, json, gzip, random, time
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests/fixtures/eval'))
from make_metric_reference import evaluate, read_qrels
import numpy as np, torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from pathlib import Path
torch.set_num_threads(2)
pruned_dir = sys.argv[1]; ncal=int(sys.argv[2]); ridge=float(sys.argv[3]) if len(sys.argv)>3 else 1e-3
def read_jsonl(p):
    with gzip.open(p,'rt') as f: return [json.loads(l) for l in f if l.strip()]
teacher = SentenceTransformer(str(ROOT/'models/all-MiniLM-L6-v2'), device='cpu'); teacher.max_seq_length=256
student = SentenceTransformer(str(ROOT/'models/all-MiniLM-L6-v2'), device='cpu'); student.max_seq_length=256
w = load_file(f'{pruned_dir}/model.safetensors')
pre = [k for k in w if 'encoder.layer.0.intermediate.dense.weight' in k][0].split('encoder.layer.0')[0]
bert = student[0].auto_model
for i,layer in enumerate(bert.encoder.layer):
    W1=w[f'{pre}encoder.layer.{i}.intermediate.dense.weight']; b1=w[f'{pre}encoder.layer.{i}.intermediate.dense.bias']
    W2=w[f'{pre}encoder.layer.{i}.output.dense.weight']; b2=w[f'{pre}encoder.layer.{i}.output.dense.bias']
    l1=torch.nn.Linear(W1.shape[1],W1.shape[0]); l1.weight.data=W1.clone(); l1.bias.data=b1.clone()
    l2=torch.nn.Linear(W2.shape[1],W2.shape[0]); l2.weight.data=W2.clone(); l2.bias.data=b2.clone()
    layer.intermediate.dense=l1; layer.output.dense=l2
# check other weights equal
sd = bert.state_dict()
for k,v in w.items():
    kk = k[len(pre):] if k.startswith(pre) else k
    if kk in sd and sd[kk].shape==v.shape and not torch.equal(sd[kk],v): print('diff', kk)
corpus = read_jsonl(ROOT/'data/scifact/corpus.jsonl.gz')
docs_all = [(d.get('title','')+' '+d['text']).strip() for d in corpus]
rng = random.Random(0); cal = rng.sample(docs_all, ncal)
tbert = teacher[0].auto_model
def evaluate_model(st, name):
    out={}
    for ds in ['cranfield','scifact']:
        data=ROOT/'data'/ds
        qrels=read_qrels(data/'qrels'/'test.tsv'); corpus=read_jsonl(data/'corpus.jsonl.gz')
        queries=[q for q in read_jsonl(data/'queries.jsonl.gz') if q['_id'] in qrels]
        docs=[(d.get('title','')+' '+d['text']).strip() for d in corpus]
        d=st.encode(docs,batch_size=32,convert_to_numpy=True,normalize_embeddings=True)
        q=st.encode([x['text'] for x in queries],batch_size=32,convert_to_numpy=True,normalize_embeddings=True)
        s=q@d.T; run={}
        for i,qq in enumerate(queries):
            top=np.argsort(-s[i])[:1000]; run[qq['_id']]={corpus[j]['_id']:float(s[i,j]) for j in top}
        out[ds]=evaluate(run,qrels)['mean']['ndcg@10']
    print(name, json.dumps(out), flush=True); return out
if '--base' in sys.argv: evaluate_model(student,'before')
tok = student.tokenizer
t0=time.time()
pending=[]
for li in range(len(bert.encoder.layer)):
    layer = bert.encoder.layer[li]; tl = tbert.encoder.layer[li]
    XtX=None; XtY=None; n=0
    caught={}
    def hook(mod, inp, out): caught['x']=inp[0].detach()
    h = layer.intermediate.register_forward_hook(hook)
    with torch.no_grad():
        for b in range(0,len(cal),32):
            enc = tok(cal[b:b+32], padding=True, truncation=True, max_length=256, return_tensors='pt')
            bert(**enc)
            x = caught['x'][enc['attention_mask'].bool()]  # tokens x 384
            feats = layer.intermediate(x)                 # gelu(W1 x+b1)
            target = tl.output.dense(tl.intermediate(x))
            A = torch.cat([feats, torch.ones(len(x),1)],1).double()
            Y = target.double()
            XtX = A.T@A if XtX is None else XtX + A.T@A
            XtY = A.T@Y if XtY is None else XtY + A.T@Y
            n += len(x)
    h.remove()
    k = XtX.shape[0]
    lam = ridge * XtX.diagonal().mean()
    sol = torch.linalg.solve(XtX + lam*torch.eye(k,dtype=torch.float64), XtY)  # (k+1) x 384
    before = layer.output.dense.weight.data.clone()
    pending.append((layer, sol))
    if '--oneshot' not in sys.argv:
        for L,S in pending: L.output.dense.weight.data = S[:-1].T.float().contiguous(); L.output.dense.bias.data = S[-1].float()
        pending.clear()
    print(f'layer {li}: {n} tokens, k={k-1}, {time.time()-t0:.0f}s', flush=True)
for L,S in pending: L.output.dense.weight.data = S[:-1].T.float().contiguous(); L.output.dense.bias.data = S[-1].float()
evaluate_model(student, f'refit {sys.argv[4:]} ncal={ncal} ridge={ridge}')
