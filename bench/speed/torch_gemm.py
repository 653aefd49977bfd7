"""PyTorch's matmul throughput on the shapes of bench/speed.sh's SmolLM2 step, the peer figure for
lorad-kernels' gemm_layouts example:

    OMP_NUM_THREADS=2 bench/.venv/bin/python bench/speed/torch_gemm.py
"""
import torch, time
torch.set_num_threads(2)
def bench(f, reps=20):
    f(); f()
    t=time.perf_counter()
    for _ in range(reps): f()
    return (time.perf_counter()-t)/reps*1e3
n=1024
for (k,o) in [(576,576),(576,192),(576,1536),(1536,576),(576,49152)]:
    x=torch.randn(n,k); W=torch.randn(o,k); g=torch.randn(n,o)
    fl=2*n*k*o/1e9
    a=bench(lambda: x@W.t()); b=bench(lambda: g@W)
    print(f"n{n} k{k} out{o}: fwd x@W^T {a:.2f} ms ({fl/a*1e3:.0f} GF/s)  bwd g@W {b:.2f} ms ({fl/b*1e3:.0f} GF/s)")
