"""The segmentation task: loss with ignore index and aux head, mIoU from a confusion matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from maskd_core.errors import DataError
from maskd_core.tasks import TASKS, Task
from maskd_core.tasks.segmentation import confusion_matrix, scores_from_confusion


@pytest.fixture
def task() -> Task:
    return TASKS.get("segmentation")()


class FixedLogits(nn.Module):
    """Returns given logits whatever the images, as a tensor or a torchvision-style dict."""

    def __init__(self, out: torch.Tensor, aux: torch.Tensor | None = None, as_dict: bool = True):
        super().__init__()
        self.out, self.aux, self.as_dict = out, aux, as_dict

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if not self.as_dict:
            return self.out
        return {"out": self.out} if self.aux is None else {"out": self.out, "aux": self.aux}


def test_registered_with_miou_as_primary_metric(task: Task) -> None:
    assert task.primary_metric == "miou" and task.name == "segmentation"


def test_collate_stacks_and_refuses_mixed_sizes(task: Task) -> None:
    samples = [(torch.rand(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64)) for _ in range(3)]
    images, masks = task.collate(samples)
    assert images.shape == (3, 3, 4, 5) and masks.shape == (3, 4, 5)
    assert task.batch_size((images, masks)) == 3 and task.example_input((images, masks)) is images
    with pytest.raises(DataError, match="image_size"):
        task.collate([*samples, (torch.rand(3, 6, 6), torch.zeros(6, 6, dtype=torch.int64))])


def test_cross_entropy_ignores_255_and_upsamples_logits(task: Task) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[0, :4] = 255
    loss, parts = task.training_loss(
        FixedLogits(logits, as_dict=False), (torch.zeros(2, 3, 8, 8), masks)
    )

    upsampled = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    labelled = masks != 255
    per_pixel = -F.log_softmax(upsampled, 1).gather(1, masks.clamp(max=2)[:, None])[:, 0]
    assert loss.item() == pytest.approx(per_pixel[labelled].mean().item(), rel=1e-5)
    assert parts == {"task_loss": pytest.approx(loss.item())}


def test_changing_ignored_pixels_changes_nothing(task: Task) -> None:
    logits = torch.randn(1, 4, 8, 8)
    masks = torch.randint(0, 4, (1, 8, 8))
    masks[:, :, :3] = 255
    model = FixedLogits(logits)
    reference, _ = task.training_loss(model, (torch.zeros(1, 3, 8, 8), masks))
    shifted = logits.clone()
    shifted[..., :3] += 10 * torch.randn(1, 4, 8, 3)
    moved, _ = task.training_loss(FixedLogits(shifted), (torch.zeros(1, 3, 8, 8), masks))
    assert moved.item() == pytest.approx(reference.item())


def test_all_ignored_batch_gives_zero_not_nan(task: Task) -> None:
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss, _ = task.training_loss(
        FixedLogits(logits), (torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 255))
    )
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_aux_head_is_weighted_0_4(task: Task) -> None:
    out, aux = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    masks = torch.randint(0, 3, (1, 4, 4))
    batch = (torch.zeros(1, 3, 4, 4), masks)
    loss, parts = task.training_loss(FixedLogits(out, aux), batch)
    assert parts["aux_loss"] == pytest.approx(F.cross_entropy(aux, masks).item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["task_loss"] + 0.4 * parts["aux_loss"], rel=1e-5)


def test_confusion_and_miou_on_a_hand_checked_case() -> None:
    truth = torch.tensor([[0, 0, 1, 1, 255, 2]])
    predicted = torch.tensor([[0, 1, 1, 1, 0, 1]])
    confusion = confusion_matrix(predicted, truth, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 1] = 1, 1, 2, 1
    assert torch.equal(confusion, expected)
    # IoU: class 0 = 1/2, class 1 = 2/4, class 2 = 0/1; class 3 never occurs and is left out.
    scores = scores_from_confusion(confusion)
    assert scores["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert scores["pixel_acc"] == pytest.approx(3 / 5)


def test_evaluate_accumulates_over_batches(task: Task) -> None:
    masks = torch.tensor([[[0, 1], [1, 1]]])
    logits = F.one_hot(torch.tensor([[[0, 1], [0, 1]]]), 2).permute(0, 3, 1, 2).float()
    batches = [(torch.zeros(1, 3, 2, 2), masks)] * 2
    scores = task.evaluate(FixedLogits(logits), batches, torch.device("cpu"))
    # Per batch: class 0 IoU 1/2, class 1 IoU 2/3, pixel accuracy 3/4 (the same twice).
    assert scores == {"miou": pytest.approx((1 / 2 + 2 / 3) / 2), "pixel_acc": pytest.approx(0.75)}


def test_mask_class_beyond_the_model_is_a_data_error() -> None:
    with pytest.raises(DataError, match="num_classes"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.int64), torch.tensor([[0, 5]]), 3)
