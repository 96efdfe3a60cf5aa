"""Image folders and labels files as datasets: decoding against Pillow by hand and torchvision's transforms,
streaming against in memory, and hostile folders (one-line errors naming the file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from decorr.data import load_dataset, require_training_images
from decorr.data import StreamedSplit
from decorr.errors import DecorrError
from transfer_helpers import evaluate


def _image(rng, w, h, gray=False):
    shape = (h, w) if gray else (h, w, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _by_hand(path, mode="RGB"):
    array = np.array(Image.open(path).convert(mode))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _class_folder(root, sizes=((30, 40), (30, 40), (30, 40), (30, 40), (30, 40)), gray=False):
    rng = np.random.default_rng(0)
    files = []
    for k, (w, h) in enumerate(sizes):
        cls = ("zebra", "ant", "moth")[k % 3]
        ext = "jpg" if k % 2 else "png"
        path = root / cls / f"img{k}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(rng, w, h, gray).save(path, quality=90) if ext == "jpg" else _image(rng, w, h, gray).save(path)
        files.append(path)
    return files


def test_class_subfolders_load_the_pixels_pillow_decodes(tmp_path):
    _class_folder(tmp_path)
    data = load_dataset(str(tmp_path))
    classes = ["ant", "moth", "zebra"]  # sorted folder names, as ImageFolder
    folder = torchvision.datasets.ImageFolder(str(tmp_path))
    assert folder.classes == classes and data.num_classes == 3 and len(data.train) == 0
    assert data.test.labels.tolist() == [label for _, label in folder.samples]
    for k, (path, _) in enumerate(folder.samples):
        assert torch.equal(data.test.images[k], torch.from_numpy(_by_hand(path)))
    with pytest.raises(DecorrError, match="no training images"):
        require_training_images(data)


def test_resize_and_centre_crop_equal_torchvision(tmp_path):
    sizes = [(30, 40), (41, 23), (64, 64), (17, 50), (50, 17)]
    _class_folder(tmp_path, sizes)
    folder = torchvision.datasets.ImageFolder(str(tmp_path))
    for crop, resize in ((16, None), (24, 28), (17, 17)):
        data = load_dataset(str(tmp_path), image_size=crop, resize=resize)
        oracle = transforms.Compose([transforms.Resize(resize or crop), transforms.CenterCrop(crop)])
        assert data.input_shape == (3, crop, crop)
        for k, (path, _) in enumerate(folder.samples):
            expected = np.asarray(oracle(Image.open(path).convert("RGB"))).transpose(2, 0, 1)
            assert torch.equal(data.test.images[k], torch.from_numpy(np.ascontiguousarray(expected))), (crop, path)


def test_grayscale_when_all_are(tmp_path):
    files = _class_folder(tmp_path, gray=True)
    data = load_dataset(str(tmp_path))
    assert data.input_shape == (1, 40, 30)
    by_name = {p.name: p for p in files}
    folder = torchvision.datasets.ImageFolder(str(tmp_path))
    for k, (path, _) in enumerate(folder.samples):
        assert torch.equal(data.test.images[k], torch.from_numpy(_by_hand(by_name[path.split("/")[-1]], "L")))


def test_labels_csv_layouts(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a" / "images").mkdir(parents=True)
    names = ["x.png", "y.jpeg", "z.png"]
    for name in names:
        _image(rng, 20, 20).save(tmp_path / "a" / "images" / name)
    # TransferAttack's labels.csv: filename,label
    (tmp_path / "a" / "labels.csv").write_text("filename,label\nz.png,7\nx.png,2\ny.jpeg,0\n")
    data = load_dataset(str(tmp_path / "a"))
    assert data.test.labels.tolist() == [7, 2, 0] and data.num_classes == 8
    for k, name in enumerate(["z.png", "x.png", "y.jpeg"]):
        assert torch.equal(data.test.images[k], torch.from_numpy(_by_hand(tmp_path / "a" / "images" / name)))
    # headerless TSV given by path
    (tmp_path / "a" / "list.tsv").write_text("x.png\t1\ny.jpeg\t3\n")
    assert load_dataset(str(tmp_path / "a" / "list.tsv")).test.labels.tolist() == [1, 3]
    # NIPS 2017 dev set: ImageId without extension, TrueLabel 1-based
    (tmp_path / "n" / "images").mkdir(parents=True)
    for name in ("0a1b", "ff00"):
        _image(rng, 20, 20).save(tmp_path / "n" / "images" / f"{name}.png")
    (tmp_path / "n" / "dev_dataset.csv").write_text(
        "ImageId,URL,x1,y1,x2,y2,TrueLabel,TargetClass\n0a1b,u,0,0,1,1,1,5\nff00,u,0,0,1,1,1000,9\n")
    nips = load_dataset(str(tmp_path / "n"), label_offset=-1)
    assert nips.test.labels.tolist() == [0, 999] and nips.num_classes == 1000
    # a class map: one name per line
    (tmp_path / "names.txt").write_text("n01 tench\nn02 goldfish\nn03 shark\n")
    (tmp_path / "m").mkdir()
    _image(rng, 20, 20).save(tmp_path / "m" / "q.png")
    (tmp_path / "m" / "labels.csv").write_text("file,class\nq.png,n03\n")
    mapped = load_dataset(str(tmp_path / "m"), class_map=str(tmp_path / "names.txt"))
    assert mapped.test.labels.tolist() == [2] and mapped.num_classes == 3
    (tmp_path / "map.json").write_text(json.dumps({"ant": 5, "moth": 1, "zebra": 0}))
    _class_folder(tmp_path / "c")
    assert set(load_dataset(str(tmp_path / "c"), class_map=str(tmp_path / "map.json")).test.labels.tolist()) == {0, 1, 5}


def test_a_set_over_the_budget_is_streamed_with_the_same_results(tmp_path):
    sizes = [(40 + k % 7, 36 + k % 5) for k in range(24)]
    _class_folder(tmp_path, sizes)
    memory = load_dataset(str(tmp_path), image_size=32)
    streamed = load_dataset(str(tmp_path), image_size=32, memory_budget_mb=0.01, workers=2)
    assert isinstance(streamed.test, StreamedSplit) and not isinstance(memory.test, StreamedSplit)
    assert torch.equal(streamed.test.load().images, memory.test.images)
    # passes with no batch size of their own (the fingerprint) take the largest batch whose stream fits: the
    # budget holds 10485 B // 3072 B = 3 images, 2 workers keep 2 x 2 chunks + 1 copied: no batch fits, so 1
    assert streamed.test.budget_batch_size() == 1
    with pytest.raises(DecorrError, match="streamed"):
        streamed.test.images  # noqa: B018 - a tool that needs memory says so in one line
    torch.manual_seed(0)
    models = {"r18": torchvision.models.resnet18(num_classes=3).eval(),
              "small": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)).eval()}
    kwargs = dict(eps_list=[8 / 255], steps=2, step_size=4 / 255, batch_size=10, features=False)
    a = evaluate(models, memory.test, **kwargs)
    b = evaluate(models, streamed.test, **kwargs)
    assert a["by_eps"] == b["by_eps"] and a["models"] == b["models"]
    assert a["settings"]["samples_sha256"] == b["settings"]["samples_sha256"]  # streamed digest = in memory
    a = evaluate(models, memory.test, only_correct=True, **kwargs)
    b = evaluate(models, streamed.test, only_correct=True, **kwargs)
    assert a["by_eps"] == b["by_eps"]


@pytest.mark.parametrize("case, expect", [
    ("unreadable", "broken.png"),
    ("truncated", "cut.png"),
    ("missing_label", "line 3: image b.png has no label"),
    ("not_integer", "label 'cat' of image a.png is not an integer"),
    ("outside_map", "label 'n09' of image a.png is not in the class map"),
    ("folder_not_in_map", "class folder"),
    ("missing_image", "image gone.png not found"),
    ("empty_class", "holds no images"),
    ("stray", "lies directly in"),
    ("sizes_differ", "give --image-size"),
    ("twice", "listed twice"),
])
def test_hostile_folders_are_one_line_errors_naming_the_file(tmp_path, case, expect):
    rng = np.random.default_rng(2)
    root = tmp_path / "d"
    root.mkdir()
    options = {}
    if case in ("unreadable", "truncated", "folder_not_in_map", "empty_class", "stray", "sizes_differ"):
        (root / "k1").mkdir()
        _image(rng, 20, 20).save(root / "k1" / "ok.png")
        if case == "unreadable":
            (root / "k1" / "broken.png").write_bytes(b"not an image at all")
        elif case == "truncated":
            _image(rng, 64, 64).save(root / "k1" / "cut.png")
            data = (root / "k1" / "cut.png").read_bytes()
            (root / "k1" / "cut.png").write_bytes(data[: len(data) // 2])
        elif case == "folder_not_in_map":
            (tmp_path / "map.txt").write_text("k0\n")
            options["class_map"] = str(tmp_path / "map.txt")
        elif case == "empty_class":
            (root / "k2").mkdir()
        elif case == "stray":
            _image(rng, 20, 20).save(root / "loose.png")
        elif case == "sizes_differ":
            _image(rng, 21, 20).save(root / "k1" / "wide.png")
    else:
        _image(rng, 20, 20).save(root / "a.png")
        _image(rng, 20, 20).save(root / "b.png")
        text = {"missing_label": "filename,label\na.png,1\nb.png,\n", "not_integer": "filename,label\na.png,cat\n",
                "outside_map": "filename,label\na.png,n09\n", "missing_image": "filename,label\ngone.png,1\n",
                "twice": "filename,label\na.png,1\na.png,2\n"}[case]
        (root / "labels.csv").write_text(text)
        if case == "outside_map":
            (tmp_path / "map.txt").write_text("n01\nn02\n")
            options["class_map"] = str(tmp_path / "map.txt")
    with pytest.raises(DecorrError) as info:
        load_dataset(str(root), **options)
    message = str(info.value)
    assert "\n" not in message and expect in message, message


@pytest.mark.parametrize("workers, budget_images, batch", [(2, 24, 3), (2, 20, 4), (0, 12, 5), (1, 25, 8)])
def test_the_stream_holds_no_more_decoded_images_than_its_plan(tmp_path, workers, budget_images, batch):
    # counted, not guessed from RSS: every decode (in any worker) against the batches the consumer moved past
    from decorr.data.accounting import CountedSplit

    _class_folder(tmp_path, [(40 + k % 7, 36 + k % 5) for k in range(30)])
    budget = budget_images * 3 * 16 * 16 / 2**20
    memory = load_dataset(str(tmp_path), image_size=16).test
    split = load_dataset(str(tmp_path), image_size=16, memory_budget_mb=budget, workers=workers).test
    plan = split.stream_plan(batch)
    assert plan.within_budget and plan.resident_images <= budget_images
    assert plan.chunk == max(1, min(batch, (budget_images - 2 * batch) // (2 * workers + 1)))
    counted = CountedSplit(split)
    images = [x for x, _ in counted.batches(batch)]
    assert [len(x) for x in images] == [batch] * (30 // batch) + ([30 % batch] if 30 % batch else [])
    assert torch.equal(torch.cat(images), memory.images)  # the same bytes as in memory, whatever the chunks
    assert 0 < counted.peak_images <= plan.resident_images
    assert counted.peak_bytes <= plan.budget_bytes


def test_a_batch_over_the_budget_warns_with_the_batch_size_that_fits(tmp_path):
    _class_folder(tmp_path, [(40, 36)] * 30)
    split = load_dataset(str(tmp_path), image_size=16, memory_budget_mb=20 * 768 / 2**20, workers=1).test
    with pytest.warns(UserWarning, match=r"over --memory-budget-mb .*; give --batch-size 8 or raise"):
        list(split.batches(10))
    assert split.stream_plan(8).within_budget and not split.stream_plan(9).within_budget
    tiny = load_dataset(str(tmp_path), image_size=16, memory_budget_mb=2 * 768 / 2**20, workers=1).test
    with pytest.warns(UserWarning, match=r"raise it to 0.00366 MiB or use fewer --workers \(now 1\)"):
        list(tiny.batches(4))
