"""Profile one stage-1 and one stage-2 call (block index 2) of the real pipeline: op table by
device time grouped by input shape, launches per step."""
import sys, time, torch
sys.path.insert(0, "scripts")
from liftquant.quantize import blocktrain as bt

orig_step, orig_train = bt._step_loss, bt.train_block
st = {"call": -1, "step": 0, "prof": None}
PROF_CALLS = {4, 5}
P0, PN = 30, 10


def step(*a, **k):
    n = st["step"]; st["step"] += 1
    c = st["call"]
    if c in PROF_CALLS and n == P0:
        torch.cuda.synchronize(); st["t0"] = time.perf_counter()
        st["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA],
                                            record_shapes=True)
        st["prof"].__enter__()
    if c in PROF_CALLS and n == P0 + PN:
        torch.cuda.synchronize(); wall = (time.perf_counter() - st["t0"]) / PN
        p = st["prof"]; p.__exit__(None, None, None)
        ka = p.key_averages()
        cuda = sum(e.self_device_time_total for e in ka) / PN / 1e3
        cpu = sum(e.self_cpu_time_total for e in ka) / PN / 1e3
        launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")) / PN
        print(f"=== PROFILE stage call {c}: wall {wall*1e3:.1f} ms/step, kernels {cuda:.1f} ms/step, "
              f"cpu self {cpu:.1f} ms/step, launches {launches:.0f}/step", flush=True)
        print(ka.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70), flush=True)
        ks = p.key_averages(group_by_input_shape=True)
        print(ks.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=40,
                       max_shapes_column_width=110), flush=True)
    return orig_step(*a, **k)


def train(*a, **k):
    st["call"] += 1; st["step"] = 0
    t0 = time.perf_counter()
    out = orig_train(*a, **k)
    torch.cuda.synchronize()
    print(f"=== stage call {st['call']}: {time.perf_counter() - t0:.2f} s, {st['step']} steps", flush=True)
    return out


bt._step_loss, bt.train_block = step, train
import liftquant.quantize.calibrate as cal
cal.train_block = train
import bench_scale
sys.exit(bench_scale.main(sys.argv[1:]))
