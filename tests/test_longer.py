"""Longer videos by chaining segments (img2vid.longer): the orchestration with a fake segment, then the real tiny
pipeline chained against the same calls made by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

import img2vid.longer
from img2vid import Pipeline
from img2vid.errors import InputError
from img2vid.longer import chain_segments, check_segments

H, W, FRAMES, STEPS = 32, 48, 3, 2  # the tiny model needs multiples of 4 (2 VAE levels x 2 UNet levels)


class FakeSegment:
    """Records what each call got and returns fresh random (F, 3, H, W) frames in [0, 1]."""

    def __init__(self, frames: int, dtype: torch.dtype = torch.float32) -> None:
        self.frames, self.dtype = frames, dtype
        self.inputs: list[object] = []
        self.outputs: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, image: object) -> torch.Tensor:
        self.inputs.append(image)
        self.outputs.append(torch.rand(self.frames, 3, 4, 6, generator=self.gen).to(self.dtype))
        return self.outputs[-1]


@pytest.mark.parametrize("segments, frames", [(1, 5), (2, 5), (4, 3), (3, 2), (1, 1)])
def test_each_segment_continues_from_the_last_frame(segments, frames):
    fake, events = FakeSegment(frames), []
    image = "first.png"  # anything the pipeline accepts: the first segment gets it as it is
    out = chain_segments(fake, image, segments, on_segment=lambda k, n: events.append((k, n)))
    assert events == [(k, segments) for k in range(1, segments + 1)]  # 1-based, before each segment
    assert len(fake.inputs) == segments and fake.inputs[0] is image
    for k in range(1, segments):
        got, last = fake.inputs[k], fake.outputs[k - 1][-1]
        assert isinstance(got, torch.Tensor) and got.shape == (3, 4, 6) and got.dtype == torch.float32
        assert torch.equal(got, last)
    assert out.shape == (segments * (frames - 1) + 1, 3, 4, 6) and out.device.type == "cpu"
    # the whole first segment, then every later one without its first frame (the repeated conditioning frame)
    assert torch.equal(out, torch.cat([fake.outputs[0], *(o[1:] for o in fake.outputs[1:])]))


def test_conditioning_is_a_float32_copy():
    """float16 frames (the GPU default) stay float16 in the video; the next segment gets float32, and a copy:
    editing it in place does not change the video."""

    class Scribbler(FakeSegment):
        def __call__(self, image: object) -> torch.Tensor:
            out = super().__call__(image)
            if isinstance(image, torch.Tensor):
                image.zero_()
            return out

    fake = Scribbler(3, torch.float16)
    out = chain_segments(fake, "first.png", 3)
    assert out.dtype == torch.float16 and all(x.dtype == torch.float32 for x in fake.inputs[1:])
    assert torch.equal(out, torch.cat([fake.outputs[0], fake.outputs[1][1:], fake.outputs[2][1:]]))


def test_each_segment_leaves_the_device_before_the_next_starts(monkeypatch):
    events, to_host = [], img2vid.longer.to_host
    monkeypatch.setattr(img2vid.longer, "to_host", lambda t: events.append(("to_host", len(t))) or to_host(t))
    fake = FakeSegment(4)
    chain_segments(lambda im: events.append(("segment",)) or fake(im), "x.png", 3)
    assert events == [("segment",), ("to_host", 4)] * 3


def test_one_segment_is_returned_uncopied(monkeypatch):
    # One segment is the plain video: returned where the segment left it (an export rounds GPU frames there)
    events = []
    monkeypatch.setattr(img2vid.longer, "to_host", lambda t: events.append("to_host") or t)
    fake = FakeSegment(4)
    assert chain_segments(fake, "x.png", 1) is fake.outputs[0] and events == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_segments_come_back_on_the_cpu():
    fake = FakeSegment(3, torch.float16)
    out = chain_segments(lambda im: fake(im).cuda(), "x.png", 2)
    assert out.device.type == "cpu" and fake.inputs[1].device.type == "cpu"
    assert torch.equal(out, torch.cat([fake.outputs[0], fake.outputs[1][1:]]))


@pytest.mark.parametrize("segments", [0, -1, 2.0, "3", True, None])
def test_bad_segment_counts_are_rejected(segments):
    fake = FakeSegment(3)
    with pytest.raises(InputError, match=r"^segments must be an integer >= 1, got "):
        chain_segments(fake, "x.png", segments)
    assert fake.inputs == []  # before any (slow) segment runs


def test_one_frame_segments_cannot_be_chained():
    with pytest.raises(InputError, match="2 segments need at least 2 frames per segment, got 1"):
        check_segments(2, 1)
    check_segments(1, 1)  # one segment of one frame is just the plain call
    check_segments(64, None)  # frames not known yet
    fake = FakeSegment(1)
    with pytest.raises(InputError, match="3 segments need at least 2 frames per segment, got 1"):
        chain_segments(fake, "x.png", 3)
    assert len(fake.inputs) == 1  # found out from the first segment's frames, before a second runs


@pytest.mark.parametrize(
    "returned, needle",
    [
        (torch.rand(1, 3, 3, 4, 6), r"\(F, 3, H, W\) frames \(e.g. .frames\[0\]\), got \(1, 3, 3, 4, 6\)"),
        ([torch.rand(3, 4, 6)], r"got list"),
    ],
)
def test_a_segment_must_return_frames(returned, needle):
    with pytest.raises(InputError, match=needle):
        chain_segments(lambda im: returned, "x.png", 2)


def test_segments_must_agree_in_size():
    sizes = iter([(4, 6), (8, 6)])
    with pytest.raises(InputError, match=r"segment 2 has frames of \(3, 8, 6\), not \(3, 4, 6\)"):
        chain_segments(lambda im: torch.rand(3, 3, *next(sizes)), "x.png", 2)


def test_segments_must_agree_in_length_and_fill_one_preallocated_video(monkeypatch):
    """The video is allocated once and filled (a list joined by torch.cat held it twice at the end); a segment of
    another length is named instead of overflowing it."""
    lengths = iter([3, 4])
    with pytest.raises(InputError, match=r"segment 2 has 4 frames, not 3"):
        chain_segments(lambda im: torch.rand(next(lengths), 3, 4, 6), "x.png", 2)
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("the segments were joined by a copy"))
    made = []

    def segment(image: object) -> torch.Tensor:
        made.append(torch.rand(3, 3, 4, 6))
        return made[-1]

    video = chain_segments(segment, "x.png", 3)
    assert torch.equal(video, torch.stack([made[0][0], made[0][1], made[0][2], *made[1][1:], *made[2][1:]]))


# ---- the real tiny pipeline ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_config("tiny", seed=3)


KW = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, output_type="pt")


def test_a_chain_is_the_pipeline_called_by_hand(pipe):
    """3 segments = three pipeline calls, one generator continued, each conditioned on the previous last frame."""
    image = make_image(56, 40, seed=0)
    g = torch.manual_seed(11)
    chained = chain_segments(lambda im: pipe(im, generator=g, **KW).frames[0], image, segments=3)

    g = torch.manual_seed(11)
    first = pipe(image, generator=g, **KW).frames[0]
    second = pipe(first[-1], generator=g, **KW).frames[0]
    third = pipe(second[-1], generator=g, **KW).frames[0]
    assert chained.shape == (3 * (FRAMES - 1) + 1, 3, H, W)
    assert torch.equal(chained, torch.cat([first, second[1:], third[1:]]))
    # the continued generator draws new noise: the segments are not copies of one another
    assert not torch.equal(second[1:], third[1:])


def test_one_segment_is_the_plain_call(pipe):
    image = make_image(56, 40, seed=1)
    plain = pipe(image, generator=torch.manual_seed(5), **KW).frames[0]
    g = torch.manual_seed(5)
    one = chain_segments(lambda im: pipe(im, generator=g, **KW).frames[0], image, segments=1)
    assert torch.equal(one, plain)
