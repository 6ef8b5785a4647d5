"""Where a pipeline step's time goes: blocks 2 (as is), 3 (loss syncs removed: measurement
only), 4 (as is, torch.profiler over steps 30..40 of each stage)."""
import sys, time, torch
sys.path.insert(0, "scripts")
from liftquant.quantize import blocktrain as bt

orig_step, orig_train = bt._step_loss, bt.train_block
st = {"call": -1, "step": 0, "prof": None}
NOSYNC_CALLS = {4, 5}      # block 3 (calls 0,1 block 1; 2,3 block 2; 4,5 block 3)
PROF_CALLS = {6, 7}        # block 4
P0, PN = 30, 10


def nosync_step(block, data, x, y, layers):
    splits = bt._micro_splits(x.shape[0], data.micro_batch)
    for layer in layers:
        layer.accumulate_latent_grad = len(splits) > 1
    total, denom = 0.0, y.numel()
    for sl in splits:
        xs, ys = x[sl], y[sl]
        with data.autocast():
            out = bt.forward_block(block, xs, data.stream.kwargs(xs.shape[0]))
        loss = (out.float() - ys.float()).square().sum() / denom
        loss.backward()
        total = total + loss.detach()
    return total, True


def step(*a, **k):
    n = st["step"]; st["step"] += 1
    c = st["call"]
    if c in PROF_CALLS and n == P0:
        torch.cuda.synchronize(); st["t0"] = time.perf_counter()
        st["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA])
        st["prof"].__enter__()
    if c in PROF_CALLS and n == P0 + PN:
        torch.cuda.synchronize(); wall = (time.perf_counter() - st["t0"]) / PN
        p = st["prof"]; p.__exit__(None, None, None)
        ka = p.key_averages()
        cuda = sum(e.self_device_time_total for e in ka) / PN / 1e3
        cpu = sum(e.self_cpu_time_total for e in ka) / PN / 1e3
        print(f"=== PROFILE stage call {c}: wall {wall*1e3:.1f} ms/step, kernels {cuda:.1f} ms/step, "
              f"cpu self {cpu:.1f} ms/step", flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50), flush=True)
        print(ka.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=50), flush=True)
    if c in NOSYNC_CALLS:
        loss, fin = nosync_step(*a, **k)
        return loss, fin
    return orig_step(*a, **k)


def train(*a, **k):
    st["call"] += 1; st["step"] = 0
    t0 = time.perf_counter()
    out = orig_train(*a, **k)
    torch.cuda.synchronize()
    print(f"=== stage call {st['call']}: {time.perf_counter() - t0:.2f} s, {st['step']} steps"
          f"{' (no loss syncs)' if st['call'] in NOSYNC_CALLS else ''}", flush=True)
    out = {k2: float(v) for k2, v in out.items()}
    return out


bt._step_loss, bt.train_block = step, train
import liftquant.quantize.calibrate as cal
cal.train_block = train
import bench_scale
sys.exit(bench_scale.main(sys.argv[1:]))
