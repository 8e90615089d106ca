#!/usr/bin/env python3
"""visionbench.py - the vision classifier against ONNX Runtime, and vision.classify end to end.

In one run, on the shipped weights:

1. model only: ``celeriac eval vision`` exports the network's parameters, reports its test accuracy and times
   Burn's forward passes (flex backend, CPU) at batch 1 and 64; the same network is built in ONNX from those
   parameters (onnx.helper) and timed in ONNX Runtime (CPU, the same number of threads) at the same batch
   sizes: the yardstick. Both runtimes' probabilities on 256 test images must agree (max |diff| <= 1e-4) and
   ONNX Runtime's test accuracy must equal Burn's, or the run fails.
2. end to end, through the Python Celery client and one release worker (Redis broker and results): 28x28 PNG
   test images sent as ``vision.classify`` tasks, all at once, with dynamic batching (``max_batch`` 64) and
   without it (``max_batch`` 1): tasks/s and the mean batch the executor ran; then the latency at a fixed 300
   tasks/s (send -> result published) p50/p99, with ``bench.noop`` at the same rate as the transport's
   yardstick; the worker's RSS with the model loaded.

Prints the figures and appends one JSON line to ``bench-results/vision.jsonl``.

Usage: CELERIAC_BIN=target/release/celeriac bench/visionbench.py [--tasks 3000] [--rate 300] [--seconds 20]
"""
import argparse
import base64
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import redis
from celery import Celery, group
from onnx import TensorProto, helper, numpy_helper

from fixed_rate import fixed_rate, percentile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "interop"))
from interop_helpers import free_port  # noqa: E402
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DATA = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def test_images():
    images = gzip.decompress((DATA / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    labels = gzip.decompress((DATA / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    return np.frombuffer(images, dtype=np.uint8).reshape(-1, 28, 28), np.frombuffer(labels, dtype=np.uint8)


def onnx_model(p):
    """The classifier of ``celeriac eval vision --export`` as an ONNX graph with outputs ``probs`` and ``embedding``."""
    inits, nodes = [], []

    def const(name, t):
        inits.append(numpy_helper.from_array(np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]), name))
        return name

    x = "images"
    for i, b in enumerate(p["blocks"], start=1):
        w = const(f"b{i}.w", b["conv_weight"])
        nodes.append(helper.make_node("Conv", [x, w], [f"b{i}.conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        names = [const(f"b{i}.{k}", b[k]) for k in ("bn_gamma", "bn_beta", "bn_mean", "bn_var")]
        nodes.append(helper.make_node("BatchNormalization", [f"b{i}.conv", *names], [f"b{i}.bn"],
                                      epsilon=b["bn_epsilon"]))
        nodes.append(helper.make_node("Relu", [f"b{i}.bn"], [f"b{i}.out"]))
        x = f"b{i}.out"
        if i in p["pool_after"]:
            nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"p{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", const("embed.w", p["embed"]["weight"]),
                                           const("embed.b", p["embed"]["bias"])], ["e"]))
    # e / max(||e||, 1e-6), as Burn's clamp_min.
    nodes.append(helper.make_node("ReduceL2", ["e"], ["norm"], keepdims=1, axes=[1]))
    inits.append(numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "eps"))
    nodes.append(helper.make_node("Max", ["norm", "eps"], ["norm_c"]))
    nodes.append(helper.make_node("Div", ["e", "norm_c"], ["embedding"]))
    inits.append(numpy_helper.from_array(np.array(p["scale"], dtype=np.float32), "scale"))
    nodes.append(helper.make_node("Mul", ["embedding", "scale"], ["scaled"]))
    nodes.append(helper.make_node("Gemm", ["scaled", const("classes.w", p["classes"]["weight"]),
                                           const("classes.b", p["classes"]["bias"])], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, "celeriac-vision",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 10]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", None])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def ort_images_per_second(sess, images, batch, seconds):
    x = (images[:batch].astype(np.float32) / 255.0).reshape(batch, 1, 28, 28)
    sess.run(None, {"images": x})
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < seconds:
        sess.run(None, {"images": x})
        passes += 1
    return passes * batch / (time.perf_counter() - start)


def png(pixels):
    """A 28x28 greyscale PNG (standard library only)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = pixels.tobytes()
    rows = b"".join(b"\x00" + raw[y * 28:(y + 1) * 28] for y in range(28))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def scrape(addr, name):
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def start_worker(binary, work, queue, prefix, max_batch, name):
    addr = f"127.0.0.1:{free_port()}"
    cfg = work / f"{name}.toml"
    cfg.write_text(f'task_default_queue = "{queue}"\n'
                   f'[broker_transport_options]\nglobal_keyprefix = "{prefix}"\n'
                   f'[result_backend_transport_options]\nglobal_keyprefix = "{prefix}"\n'
                   f'[vision]\nmax_batch = {max_batch}\nmax_wait_ms = 2.0\npreload = true\n')
    proc = subprocess.Popen([binary, "--config", str(cfg), "worker", "-Q", queue, "-c", "128", "--prefetch-multiplier",
                             "2", "--without-heartbeat", "-l", "warning", "--metrics-addr", addr],
                            stdout=open(work / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
    return proc, addr


def stop(proc):
    proc.terminate()
    proc.wait(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3000, help="vision.classify tasks per throughput run")
    ap.add_argument("--rate", type=float, default=300)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--model-seconds", type=float, default=5, help="seconds of forward passes per batch size")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    binary = os.environ.get("CELERIAC_BIN") or str(ROOT / "target/release/celeriac")
    work = Path(tempfile.mkdtemp(prefix="bench-vision-"))
    images, labels = test_images()

    # 1. Model only: Burn, then the same network in ONNX Runtime.
    export = work / "classifier.json"
    burn = json.loads(subprocess.run(
        [binary, "eval", "vision", "--export", str(export), "--batches", "1,64", "--seconds", str(args.model_seconds),
         "--threads", str(args.threads)], check=True, capture_output=True, text=True).stdout)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sess = ort.InferenceSession(onnx_model(json.loads(export.read_text())).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    n_ref = burn["reference"]["images"]
    ref = np.asarray(burn["reference"]["probs"], dtype=np.float32).reshape(n_ref, 10)
    x_all = (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    ours = sess.run(["probs"], {"images": x_all[:n_ref]})[0]
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-4, f"ONNX Runtime and Burn disagree: max |diff| {diff}"
    predicted = np.concatenate([sess.run(["probs"], {"images": x_all[i:i + 500]})[0].argmax(1)
                                for i in range(0, len(x_all), 500)])
    ort_accuracy = round(float((predicted == labels).mean()), 4)
    assert ort_accuracy == burn["test_accuracy"], (ort_accuracy, burn["test_accuracy"])
    ort_speed = {str(b): ort_images_per_second(sess, images, b, args.model_seconds) for b in (1, 64)}

    # 2. End to end through the Python Celery client.
    tag = uuid.uuid4().hex[:8]
    prefix, queue = f"bv-{tag}:", f"bench-vision-{tag}"
    r = redis.Redis.from_url(REDIS_URL)
    app = Celery("bench-vision", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
    payloads = [base64.b64encode(png(images[i])).decode() for i in range(256)]
    e2e, proc = {}, None
    try:
        for label, max_batch in (("batching", 64), ("no batching", 1)):
            proc, addr = start_worker(binary, work, queue, prefix, max_batch, label.replace(" ", "-"))
            app.send_task("vision.classify", args=[payloads[0]], queue=queue).get(timeout=120)
            batches0, images0 = scrape(addr, "celeriac_vision_batch_size_count"), scrape(addr, "celeriac_vision_batch_size_sum")
            start = time.perf_counter()
            results = group(app.signature("vision.classify", args=[payloads[i % 256]], queue=queue)
                            for i in range(args.tasks)).apply_async().get(timeout=600)
            seconds = time.perf_counter() - start
            right = sum(res["class_id"] == int(labels[i % 256]) for i, res in enumerate(results))
            batches = scrape(addr, "celeriac_vision_batch_size_count") - batches0
            ran = scrape(addr, "celeriac_vision_batch_size_sum") - images0
            e2e[label] = {"tasks_per_s": round(args.tasks / seconds, 1), "mean_batch": round(ran / max(batches, 1), 1),
                          "right": right}
            if max_batch == 64:
                noop = fixed_rate(app, queue, r, "bench.noop", lambda i: {}, args.rate, args.seconds)
                lat = fixed_rate(app, queue, r, "vision.classify", lambda i: {"image": payloads[i % 256]},
                                 args.rate, args.seconds)
                rss = int(open(f"/proc/{proc.pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024
            stop(proc)
            proc = None
    finally:
        if proc is not None:
            stop(proc)
        for k in r.scan_iter(match=f"{prefix}*", count=1000):
            r.delete(k)

    figures = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": burn["model"], "threads": args.threads,
        "test_accuracy": burn["test_accuracy"], "max_abs_diff_vs_ort": diff,
        "burn_images_per_s": burn["images_per_second"],
        "ort_images_per_s": {k: round(v, 1) for k, v in ort_speed.items()},
        "ratio_burn_to_ort": {k: round(burn["images_per_second"][k] / ort_speed[k], 2) for k in ort_speed},
        "e2e": e2e, "rate": args.rate, "seconds": args.seconds,
        "classify_p50_ms": round(percentile(lat, 0.5), 2), "classify_p99_ms": round(percentile(lat, 0.99), 2),
        "noop_p50_ms": round(percentile(noop, 0.5), 2), "noop_p99_ms": round(percentile(noop, 0.99), 2),
        "worker_rss_mb": rss,
    }
    print(f"model only ({args.threads} threads; probabilities agree within {diff:.1e}, test accuracy "
          f"{burn['test_accuracy']} in both):")
    print("  batch   Burn (flex) img/s   ONNX Runtime img/s   Burn / ORT")
    for b in ("1", "64"):
        print(f"  {b:>5}   {burn['images_per_second'][b]:>17,.0f}   {ort_speed[b]:>18,.0f}   "
              f"{figures['ratio_burn_to_ort'][b]:>10.2f}")
    print(f"end to end, {args.tasks} vision.classify tasks sent at once:")
    for label, f in e2e.items():
        print(f"  {label:<12} {f['tasks_per_s']:>8,.0f} tasks/s  (mean batch {f['mean_batch']}, "
              f"{f['right']}/{args.tasks} right)")
    print(f"  batching / no batching: {e2e['batching']['tasks_per_s'] / e2e['no batching']['tasks_per_s']:.2f}x")
    print(f"at {args.rate:.0f} tasks/s for {args.seconds:.0f} s (send -> result published):")
    print(f"  bench.noop (the yardstick)  p50 {figures['noop_p50_ms']:6.2f} ms  p99 {figures['noop_p99_ms']:6.2f} ms")
    print(f"  vision.classify             p50 {figures['classify_p50_ms']:6.2f} ms  p99 {figures['classify_p99_ms']:6.2f} ms")
    print(f"  worker RSS with the model loaded: {rss} MB")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "vision.jsonl", "a") as f:
        f.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
