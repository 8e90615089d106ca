"""The vision task family end to end: a Python Celery 5.7 client, a celeriac worker with the shipped weights,
and Fashion-MNIST's test images (Debian's ``dataset-fashion-mnist``) sent as PNG, JPEG and WebP.

    v1  classify and embed from Python: labels, probabilities, unit-length embeddings; base64, data: URL,
        http URL, JPEG and WebP give the same answer
    v2  bad input (not base64, not an image, truncated, zero-sized, over the size cap, unreachable URL) fails
        with ValueError naming the problem; the good images sent beside them succeed
    v3  512 images at once are answered in batches: every image once, most batches larger than one
    v4  vision.device = cuda on a machine without a driver logs why and runs on the CPU
    v5  vision.index / vision.search per tenant on two workers: a product's own photo finds it first, a
        tenant never sees another's products, re-indexing replaces, unindex removes, bad arguments fail
    v6  the catalog's vision.embed_product requests: the image fetched from its URL, the product's embedding
        stored and the request marked done in one transaction, then found by vision.search; an unreachable
        image fails with ValueError and leaves its request pending
    v7  vision.detect: each item of a composed scene found with its tight box and class, on a dark or a
        light canvas and in an image over 448 px; an empty canvas gives []; bad input fails with ValueError
"""
import base64
import gzip
import http.server
import io
import math
import os
import random
import struct
import threading
import zlib
from pathlib import Path

import pytest
from celery import group

from interop_helpers import free_port, metric, parse_metrics, wait_for

pytestmark = pytest.mark.celeriac_only(reason="the vision task family is celeriac's")

DATA = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
GET = 60


def fashion_images(n):
    """The first ``n`` test images (28×28 grey bytes) and their labels."""
    if not (DATA / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST is not in {DATA} (apt-get install dataset-fashion-mnist)")
    images = gzip.decompress((DATA / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((DATA / "t10k-labels-idx1-ubyte.gz").read_bytes())
    return [images[16 + i * 784:16 + (i + 1) * 784] for i in range(n)], list(labels[8:8 + n])


def png(pixels, width=28, height=28):
    """A greyscale PNG of ``pixels`` (standard library only)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def b64(data):
    return base64.b64encode(data).decode()


def pil_encode(pixels, fmt):
    """The image as JPEG or WebP, on a white background and four times larger, the way a shop photo comes."""
    from PIL import Image, ImageOps
    img = ImageOps.invert(Image.frombytes("L", (28, 28), pixels)).resize((112, 112)).convert("RGB")
    out = io.BytesIO()
    img.save(out, format=fmt, quality=95)
    return out.getvalue()


def vision_worker(workers, settings=None, **section):
    addr_port = free_port()
    worker = workers.start(concurrency=64, prefetch=4,
                           settings={**(settings or {}), "vision": {"max_wait_ms": 5, **section}},
                           extra_args=["--metrics-addr", f"127.0.0.1:{addr_port}"])
    worker.metrics_addr = f"127.0.0.1:{addr_port}"
    return worker


def scrape(worker):
    import urllib.request
    with urllib.request.urlopen(f"http://{worker.metrics_addr}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


class ImageServer:
    """Serves ``files`` (path -> bytes) over HTTP on a free port."""

    def __init__(self, files):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def classify(app, queue, image):
    return app.send_task("vision.classify", args=(image,), queue=queue)


def test_v1_classify_and_embed_from_python(workers, client_app, iso):
    vision_worker(workers)
    images, labels = fashion_images(200)
    results = group(client_app.signature("vision.classify", args=(b64(png(p)),), queue=iso.queue)
                    for p in images).apply_async().get(timeout=GET)
    right = 0
    for r, label in zip(results, labels):
        assert set(r) == {"label", "class_id", "score", "probs"}
        assert r["label"] == CLASS_NAMES[r["class_id"]]
        assert len(r["probs"]) == 10 and abs(sum(r["probs"]) - 1.0) < 1e-3
        assert r["score"] == max(r["probs"])
        right += r["class_id"] == label
    assert right >= 180, f"{right} of 200 right"

    e1 = client_app.send_task("vision.embed", args=(b64(png(images[0])),), queue=iso.queue).get(timeout=GET)
    e2 = client_app.send_task("vision.embed", args=(b64(png(images[0])),), queue=iso.queue).get(timeout=GET)
    assert len(e1) == 128
    assert abs(math.sqrt(sum(x * x for x in e1)) - 1.0) < 1e-4
    assert max(abs(a - b) for a, b in zip(e1, e2)) < 1e-5
    # Same class, closer than another class: a trouser (label 1) and a second trouser, against a bag.
    t = [i for i, label in enumerate(labels) if label == 1][:2]
    bag = next(i for i, label in enumerate(labels) if label == 8)
    emb = [client_app.send_task("vision.embed", args=(b64(png(images[i])),), queue=iso.queue).get(timeout=GET)
           for i in (t[0], t[1], bag)]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(emb[0], emb[1]) > dot(emb[0], emb[2])

    # One clear image in every form gives the same class.
    i = next(i for i, r in enumerate(results) if r["score"] > 0.99 and r["class_id"] == labels[i])
    want = results[i]["class_id"]
    server = ImageServer({"/item.png": png(images[i])})
    try:
        forms = {
            "data URL": "data:image/png;base64," + b64(png(images[i])),
            "http URL": server.url + "/item.png",
            "JPEG": b64(pil_encode(images[i], "JPEG")),
            "WebP": b64(pil_encode(images[i], "WEBP")),
        }
        for name, arg in forms.items():
            got = classify(client_app, iso.queue, arg).get(timeout=GET)
            assert got["class_id"] == want, f"{name}: {got['label']} where {CLASS_NAMES[want]} was expected"
    finally:
        server.close()


def test_v2_bad_input_fails_with_value_error_and_the_rest_carry_on(workers, client_app, iso):
    vision_worker(workers, max_image_bytes=20000)
    images, labels = fashion_images(4)
    good = png(images[0])
    zero = png(b"", width=0, height=28)  # a well-formed PNG declaring width 0
    big = png(random.Random(1).randbytes(320 * 320), width=320, height=320)  # noise: does not compress
    assert len(big) > 20000
    closed = free_port()
    bad = {
        "not base64": ("%%% not base64 %%%", "image: not valid base64"),
        "not an image": (b64(b"hello, this is text and not a picture"), "image: not a PNG, JPEG or WebP image"),
        "truncated": (b64(good[:len(good) // 2]), "image: cannot decode the PNG data"),
        "zero-sized": (b64(zero), "image: zero-sized (0x28)"),
        "over the cap": (b64(big), f"image: {len(big)} bytes is over the limit of 20000 bytes"),
        "unreachable": (f"http://127.0.0.1:{closed}/x.png", f"image: fetching http://127.0.0.1:{closed}/x.png"),
        "not a string": (42, "image: expected a base64 string"),
    }
    pending = {name: classify(client_app, iso.queue, arg) for name, (arg, _) in bad.items()}
    goods = [classify(client_app, iso.queue, b64(png(p))) for p in images]
    for r, label in zip(goods, labels):
        assert r.get(timeout=GET)["class_id"] in range(10)
    for name, r in pending.items():
        with pytest.raises(ValueError) as e:
            r.get(timeout=GET)
        assert str(e.value).startswith(bad[name][1]), f"{name}: {e.value}"
    # The worker carries on.
    assert classify(client_app, iso.queue, b64(good)).get(timeout=GET)["class_id"] in range(10)


def test_v3_a_burst_is_answered_in_batches_every_image_once(workers, client_app, iso):
    worker = vision_worker(workers, max_wait_ms=20)
    images, labels = fashion_images(512)
    before = scrape(worker)
    assert metric(before, "celeriac_vision_batch_size_count") == 0
    results = group(client_app.signature("vision.classify", args=(b64(png(p)),), queue=iso.queue)
                    for p in images).apply_async().get(timeout=GET * 2)
    assert len(results) == 512
    assert sum(r["class_id"] == label for r, label in zip(results, labels)) >= 460
    after = scrape(worker)
    assert metric(after, "celeriac_vision_batch_size_sum") == 512
    batches = metric(after, "celeriac_vision_batch_size_count")
    assert batches <= 256, f"512 images in {batches} forward passes"
    assert metric(after, "celeriac_vision_images_total", outcome="ok") == 512
    assert metric(after, "celeriac_vision_queued") == 0


def test_v4_cuda_without_a_driver_falls_back_to_the_cpu(workers, client_app, iso):
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA driver")
    worker = vision_worker(workers, device="cuda")
    wait_for(lambda: "the models run on the CPU" in worker.log_tail(200), 10, message="the fallback log line")
    images, _ = fashion_images(1)
    assert classify(client_app, iso.queue, b64(png(images[0]))).get(timeout=GET)["class_id"] in range(10)
    samples = scrape(worker)
    assert metric(samples, "celeriac_vision_device", device="cpu") == 1
    assert metric(samples, "celeriac_vision_device", device="cuda") is None


def test_v5_index_and_search_per_tenant_across_workers(workers, client_app, iso, domain):
    domain.add_tenant("shop-a")
    domain.add_tenant("shop-b")
    vision_worker(workers, settings=domain.settings())
    vision_worker(workers, settings=domain.settings())
    images, labels = fashion_images(300)
    # shop-a: 40 products, four of each class; shop-b: one product, a copy of shop-a's first.
    catalog = {}
    for i, label in enumerate(labels):
        if sum(1 for c in catalog.values() if c == label) < 4:
            catalog[i] = label
        if len(catalog) == 40:
            break
    put = group(client_app.signature("vision.index", kwargs=dict(tenant_id="shop-a", product_id=f"p{i}",
                                                                   image=b64(png(images[i]))), queue=iso.queue)
                for i in catalog).apply_async().get(timeout=GET)
    assert all(r["dim"] == 128 and r["replaced"] is False for r in put)
    first = next(iter(catalog))
    r = client_app.send_task("vision.index", kwargs=dict(tenant_id=domain.tenants["shop-b"], product_id="only",
                             image=b64(png(images[first]))), queue=iso.queue).get(timeout=GET)
    assert r == {"product_id": "only", "dim": 128, "replaced": False}
    assert domain.sql("SELECT count(*) FROM vision_embeddings") == [["41"]]

    def search(tenant, i, k=5):
        return client_app.send_task("vision.search", kwargs=dict(tenant_id=tenant, image=b64(png(images[i])), k=k),
                                    queue=iso.queue).get(timeout=GET)

    # Each product's own photo finds it first, with a cosine of 1, on whichever worker answers.
    for i in list(catalog)[:10]:
        hits = search("shop-a", i)
        assert hits[0]["product_id"] == f"p{i}" and abs(hits[0]["score"] - 1.0) < 1e-4, hits
        assert len(hits) == 5 and hits == sorted(hits, key=lambda h: -h["score"])
    # An unseen photo's nearest products are mostly of its class.
    unseen = [i for i in range(len(labels)) if i not in catalog][:30]
    same = sum(catalog[int(search("shop-a", i, k=1)[0]["product_id"][1:])] == labels[i] for i in unseen)
    assert same >= 21, f"{same} of 30 nearest products of the query's class"
    # shop-b sees only its own product.
    assert [h["product_id"] for h in search("shop-b", first, k=10)] == ["only"]
    # Re-indexing replaces (the answer and the table say so), and every worker's copy follows.
    other = next(i for i in catalog if catalog[i] != catalog[first])
    r = client_app.send_task("vision.index", kwargs=dict(tenant_id="shop-a", product_id=f"p{first}",
                             image=b64(png(images[other]))), queue=iso.queue).get(timeout=GET)
    assert r["replaced"] is True
    for _ in range(4):
        hits = search("shop-a", other, k=2)
        assert {h["product_id"] for h in hits} == {f"p{first}", f"p{other}"}, hits
    # Unindex removes it from every worker's answers.
    r = client_app.send_task("vision.unindex", kwargs=dict(tenant_id="shop-a", product_id=f"p{other}"),
                             queue=iso.queue).get(timeout=GET)
    assert r == {"product_id": f"p{other}", "deleted": True}
    for _ in range(4):
        assert f"p{other}" not in [h["product_id"] for h in search("shop-a", other, k=40)]
    assert domain.sql("SELECT count(*) FROM vision_embeddings") == [["40"]]
    # Bad arguments.
    with pytest.raises(ValueError, match="k: 0 is not between 1 and 1000"):
        search("shop-a", first, k=0)
    with pytest.raises(ValueError, match="product_id: expected 1 to 256 characters"):
        client_app.send_task("vision.index", kwargs=dict(tenant_id="shop-a", product_id=" ",
                             image=b64(png(images[0]))), queue=iso.queue).get(timeout=GET)
    with pytest.raises(Exception) as e:
        search("no-such-shop", first)
    assert type(e.value).__name__ == "UnknownTenant" and "no-such-shop" in str(e.value)


def test_v6_catalog_embed_requests_are_answered(workers, client_app, iso, domain):
    domain.add_tenant("shop-a")
    tid = domain.tenants["shop-a"]
    vision_worker(workers, settings=domain.settings())
    images, labels = fashion_images(60)
    picks = [next(i for i, label in enumerate(labels) if label == c) for c in (0, 1, 7, 9)]
    server = ImageServer({f"/img/{i}.png": png(images[i]) for i in picks})
    try:
        # The rows the sync family writes when it sees new product images (product i + 1000, image i).
        domain.sql("INSERT INTO catalog_embed_requests (tenant_id, image_id, product_id, src, content_hash, status) "
                   "VALUES " + ", ".join(f"('{tid}', {i}, {1000 + i}, '{server.url}/img/{i}.png', 'h{i}', 'pending')"
                                         for i in picks)
                   + f", ('{tid}', 99, 1099, '{server.url}/img/missing.png', 'h99', 'pending')")
        done = group(client_app.signature("vision.embed_product", kwargs=dict(
            tenant_id=tid, product_id=1000 + i, image_id=i, src=f"{server.url}/img/{i}.png", content_hash=f"h{i}"),
            queue=iso.queue) for i in picks).apply_async().get(timeout=GET)
        assert done == [{"image_id": i, "product_id": str(1000 + i), "embedded": True, "replaced": False,
                         "requested": True} for i in picks]
        with pytest.raises(ValueError, match="404"):
            client_app.send_task("vision.embed_product", kwargs=dict(
                tenant_id=tid, product_id=1099, image_id=99, src=f"{server.url}/img/missing.png", content_hash="h99"),
                queue=iso.queue).get(timeout=GET)
    finally:
        server.close()
    assert domain.sql("SELECT image_id, status FROM catalog_embed_requests ORDER BY image_id") == \
        [[str(i), "done"] for i in sorted(picks)] + [["99", "pending"]]
    assert domain.sql("SELECT product_id FROM vision_embeddings ORDER BY product_id") == \
        [[str(1000 + i)] for i in sorted(picks)]
    # The catalog's products are what visual search finds: each photo finds its own product first.
    for i in picks:
        hits = client_app.send_task("vision.search", kwargs=dict(tenant_id="shop-a", image=b64(png(images[i])), k=2),
                                    queue=iso.queue).get(timeout=GET)
        assert hits[0]["product_id"] == str(1000 + i) and abs(hits[0]["score"] - 1.0) < 1e-4, hits


def scene(tiles, spots, width, height, zoom=1, seed=5):
    """A dark noisy canvas (noise 0..40) with each 28×28 tile drawn at ``spots`` (its top-left corner),
    everything ``zoom`` times larger (nearest neighbour), and each item's tight box (pixels of at least 64)."""
    rng = random.Random(seed)
    w, h = width * zoom, height * zoom
    canvas = bytearray(rng.randrange(41) for _ in range(w * h))
    boxes = []
    for tile, (sx, sy) in zip(tiles, spots):
        xs = [x for y in range(28) for x in range(28) if tile[y * 28 + x] >= 64]
        ys = [y for y in range(28) for x in range(28) if tile[y * 28 + x] >= 64]
        boxes.append([(sx + min(xs)) * zoom, (sy + min(ys)) * zoom, (sx + max(xs) + 1) * zoom,
                      (sy + max(ys) + 1) * zoom])
        for y in range(28 * zoom):
            row = (sy * zoom + y) * w + sx * zoom
            for x in range(28 * zoom):
                v = tile[(y // zoom) * 28 + x // zoom]
                canvas[row + x] = max(canvas[row + x], v)
    return bytes(canvas), boxes


def box_iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_v7_detect_finds_each_item_with_its_tight_box_and_class(workers, client_app, iso):
    """vision.detect from Python: three items the classifier names surely, on a 160×120 noisy canvas; the
    same scene light (inverted, JPEG); the items on a 448×336 canvas sent twice as large (over 448 px: scaled
    down before detection, boxes back in the sent image's pixels); an empty canvas; bad input."""
    worker = vision_worker(workers)
    images, labels = fashion_images(100)
    sure = group(client_app.signature("vision.classify", args=(b64(png(p)),), queue=iso.queue)
                 for p in images).apply_async().get(timeout=GET)
    picks = [i for i, r in enumerate(sure) if r["score"] > 0.99 and r["class_id"] == labels[i]][:3]
    spots = [(8, 10), (70, 50), (120, 14)]
    pixels, truth = scene([images[i] for i in picks], spots, 160, 120)

    def check(found, truth, what, tolerance=0.5):
        assert len(found) == 3, f"{what}: {found}"
        for box, i in zip(truth, picks):
            best = max(found, key=lambda d: box_iou(d["box"], box))
            assert box_iou(best["box"], box) >= tolerance, f"{what}: {box} vs {found}"
            assert best["class_id"] == labels[i] and best["label"] == CLASS_NAMES[labels[i]], f"{what}: {found}"
            assert 0.3 <= best["score"] <= 1.0
        assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)

    found = client_app.send_task("vision.detect", args=(b64(png(pixels, 160, 120)),),
                                 queue=iso.queue).get(timeout=GET)
    assert all(set(d) == {"box", "label", "class_id", "score"} for d in found)
    check(found, truth, "dark PNG")

    from PIL import Image, ImageOps
    light = io.BytesIO()
    ImageOps.invert(Image.frombytes("L", (160, 120), pixels)).convert("RGB").save(light, format="JPEG", quality=95)
    check(client_app.send_task("vision.detect", args=(b64(light.getvalue()),), kwargs={"min_score": 0.3},
                               queue=iso.queue).get(timeout=GET), truth, "light JPEG")

    wide, wide_truth = scene([images[i] for i in picks], [(40, 30), (200, 150), (380, 260)], 448, 336)
    large = io.BytesIO()
    Image.frombytes("L", (448, 336), wide).resize((896, 672), Image.NEAREST).save(large, format="PNG")
    scaled = [[v * 2 for v in b] for b in wide_truth]
    check(client_app.send_task("vision.detect", args=(b64(large.getvalue()),), queue=iso.queue).get(timeout=GET),
          scaled, "896×672 PNG")

    empty = bytes(random.Random(9).randrange(41) for _ in range(96 * 64))
    assert client_app.send_task("vision.detect", args=(b64(png(empty, 96, 64)),),
                                queue=iso.queue).get(timeout=GET) == []

    with pytest.raises(ValueError) as e:
        client_app.send_task("vision.detect", args=(b64(b"not a picture at all"),), queue=iso.queue).get(timeout=GET)
    assert str(e.value).startswith("image: not a PNG, JPEG or WebP image"), e.value
    with pytest.raises(ValueError) as e:
        client_app.send_task("vision.detect", args=(b64(png(pixels, 160, 120)), 1.5),
                             queue=iso.queue).get(timeout=GET)
    assert str(e.value) == "min_score: 1.5 is not between 0 and 1", e.value
    samples = scrape(worker)
    assert metric(samples, "celeriac_vision_detector_batch_size_sum") == 4
    assert metric(samples, "celeriac_vision_detector_device", device="cpu") == 1
