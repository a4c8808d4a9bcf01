"""The fast path's choices and accounting: measured precision choice, FLOP counts, MFU in the logs."""

import pytest

from instructkit import hardware
from instructkit.metrics import training_flops


@pytest.mark.parametrize("speedup,expected", [(2.0, "bf16"), (1.1, "fp32"), (0.5, "fp32")])
def test_cpu_auto_precision_follows_the_measured_speedup(monkeypatch, speedup, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: speedup)
    assert hardware.resolve_precision("auto") == expected
    assert hardware.resolve_precision("fp32") == "fp32"


def test_training_flops_by_hand():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=4, num_hidden_layers=1, vocab_size=10, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=8)
    body = 4 * 4 * 2 + 4 * 2 * 2 + 3 * 4 * 8  # q,o + k,v (2 kv dims) + gate, up, down = 144
    attention = 3 * 2 * 2 * 1 * 4 * 6 / 2  # context 6
    assert training_flops(cfg, "lora", 10, 3, 6) == 10 * (4 * body + attention) + 3 * 4 * 4 * 10
    assert training_flops(cfg, "full", 10, 3, 6) == 10 * (6 * body + attention) + 3 * 6 * 4 * 10


@pytest.mark.parametrize("bf16_tflops,sizes", [(0.001, [128] * 4), (0.3, [128] * 4 + [512] * 6)])
def test_bf16_probe_stops_early_where_bf16_is_hopeless(monkeypatch, bf16_tflops, sizes):
    """A CPU without bf16 kernels answers from the small probe (the 512 one takes seconds there)."""
    from instructkit import metrics

    seen = []

    def peak(dtype_name, size=1024, reps=6, trials=3):
        seen.append(size)
        return bf16_tflops if dtype_name == "bfloat16" else 0.1

    monkeypatch.setattr(metrics, "matmul_peak_tflops", peak)
    assert hardware.cpu_bf16_speedup.__wrapped__() == pytest.approx(bf16_tflops / 0.1)
    assert seen == sizes


def test_matmul_peak_is_the_best_of_its_trials(monkeypatch):
    """A shared machine slows single timings: the peak MFU is taken against is the fastest trial, not the first."""
    import time

    from instructkit.metrics import matmul_peak_tflops

    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.4])  # trials of 0.5 s, 0.25 s and 0.4 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    assert matmul_peak_tflops("float32", size=4, reps=1, trials=3) == pytest.approx(2 * 4**3 / 0.25 / 1e12)


def test_evaluation_time_is_left_out_of_the_training_window(monkeypatch):
    """tokens/s and MFU measure training: an evaluation or a checkpoint inside a logging window is not counted."""
    import time

    from instructkit.metrics import TrainingMonitor, Window

    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monitor = TrainingMonitor(None, 10, 0, 5, lambda w: 1e12 * w.tokens / 100, 1.0, 1, "cpu")
    monitor.window = Window(start=clock[0])
    clock[0] += 2.0  # training
    with monitor.paused():
        clock[0] += 30.0  # evaluating
    clock[0] += 2.0
    monitor.window.add({"loss_parts": [1.0], "units": [1], "supervised": 1, "tokens": 400, "sequences": 4})
    record = monitor._record(5, 0.5, {"grad_norm": None}, 1e-3)
    assert record["elapsed_s"] == pytest.approx(4.0) and record["tokens_per_s"] == pytest.approx(100.0)
    assert record["mfu"] == pytest.approx(1.0)


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1", "cuda1-object", "cpu"])
def test_queued_gpu_work_is_finished_before_the_clock_is_read(monkeypatch, device):
    """CUDA runs kernels after the host queued them: a window ends, and a pause begins, only once the device
    has finished the training queued before it (a window's last optimizer step would otherwise be timed in the
    next window, or inside an evaluation and left out)."""
    import time

    import torch

    from instructkit import metrics
    from instructkit.metrics import TrainingMonitor, Window

    device = torch.device("cuda", 1) if device == "cuda1-object" else device
    clock, queued, synced = [100.0], [3.0], []  # seconds of GPU work still queued

    def synchronize(on) -> None:
        synced.append(on)
        clock[0] += queued[0]
        queued[0] = 0.0

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(metrics, "device_stats", lambda device: {})
    monitor = TrainingMonitor(None, 10, 0, 5, lambda w: 1e12 * w.tokens / 100, 1.0, 1, device)
    monitor.window = Window(start=clock[0])
    clock[0] += 1.0  # queueing training
    with monitor.paused():
        clock[0] += 30.0  # evaluating
    queued[0] = 2.0
    monitor.window.add({"loss_parts": [1.0], "units": [1], "supervised": 1, "tokens": 600, "sequences": 4})
    record = monitor._record(5, 0.5, {"grad_norm": None}, 1e-3)
    if str(device) == "cpu":  # nothing is queued on a CPU: never synchronized
        assert synced == [] and record["elapsed_s"] == pytest.approx(1.0)
    else:  # 1 s queueing + 3 s and 2 s of queued kernels, waited for on the run's own device
        assert synced == [device, device] and record["elapsed_s"] == pytest.approx(6.0)


def test_a_window_faster_than_the_peak_measures_the_peak_again(monkeypatch, tmp_path):
    """A peak measured while another process had the cores reads low and MFU above 100%: the first window
    that outruns it measures it again (in no window's time), keeps the higher value, and names it in its
    record; a run whose FLOP count outruns every peak stops measuring after three tries."""
    import time

    from instructkit import metrics
    from instructkit.metrics import MetricsLog, TrainingMonitor, Window, read_metrics

    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(metrics, "Window", lambda: Window(start=clock[0]))  # its default bound the real clock
    readings = iter([0.8, 0.5, 0.6, 0.7])

    def remeasure() -> float:
        clock[0] += 5.0  # measuring takes time that no window may count
        return next(readings)

    monitor = TrainingMonitor(MetricsLog(tmp_path, False), 10, 0, 1, lambda w: 1e12 * w.tokens / 100, 0.25, 1,
                              "cpu", remeasure=remeasure)
    for step, tokens in enumerate([40, 60, 90, 95, 99, 98], start=1):  # 1 s per step: tokens / 100 TFLOP/s
        clock[0] += 1.0
        monitor.step_done(step, 0.1 * step, {"loss_parts": [1.0], "units": [1], "supervised": 1, "tokens": tokens,
                                             "sequences": 4, "grad_norm": None}, 1e-3)
    monitor.close()
    records = read_metrics(tmp_path)
    assert [r["elapsed_s"] for r in records] == [1.0] * 6  # the 5 s of each measurement in no window
    assert [r["matmul_peak_tflops"] for r in records] == [0.8] * 6  # 0.4 > 0.25: measured 0.8; later lower
    assert [round(r["mfu"], 4) for r in records] == [0.5, 0.75, 1.125, 1.1875, 1.2375, 1.225]
    # measured after steps 1, 3 and 4 (0.8, then 0.5 and 0.6: lower, 0.8 kept); three tries spent, step 5's
    # 0.99 TFLOP/s measured nothing, and 0.7 is left
    assert next(readings) == 0.7


def test_only_the_logging_process_measures_again_and_a_failed_measurement_is_survived(monkeypatch):
    import time

    from instructkit.metrics import TrainingMonitor, Window

    calls = []
    monkeypatch.setattr(time, "perf_counter", lambda: 100.0 + len(calls))
    other = TrainingMonitor(None, 10, 0, 1, lambda w: 1e12, 0.25, 1, "cpu", remeasure=lambda: calls.append(1))
    other.window = Window(start=99.0)
    other.check_peak(1.0, 1)
    assert calls == []  # a process without the log never measures (its records are not written)

    def failing() -> float:
        raise RuntimeError("CUDA out of memory")

    class Log:  # the main process, writing nowhere
        def log(self, record):
            pass

    main = TrainingMonitor(Log(), 10, 0, 1, lambda w: 1e12, 0.25, 1, "cpu", remeasure=failing)
    main.check_peak(1.0, 1)
    assert main.peak == 0.25 and main.remeasures_left == 2


def test_measuring_the_peak_again_leaves_the_training_rng_as_it_was():
    """Dropout draws from the global generator: a measurement mid-run must not shift them, or a run's result
    would depend on whether the machine was busy when it started."""
    from types import SimpleNamespace

    import torch

    from instructkit.prepare import measure_peak

    run = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")),
                          plan=SimpleNamespace(compute_precision="fp32"))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert measure_peak(run, keep_rng=True) > 0
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    measure_peak(run)  # at start (before the seed is restored on resume) it may draw
    assert not torch.equal(torch.rand(3), expected)
