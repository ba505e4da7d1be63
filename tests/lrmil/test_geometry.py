"""Which part of an LR patch (and which student tokens) belongs to which HR child, on real tiled slides."""

from __future__ import annotations

import numpy as np
import torch

from wsimil.features.patches import read_block
from wsimil.lrmil.job import LRMILJob
from wsimil.lrmil.losses import pool_children
from wsimil.slide.reader import open_slide


def test_links_children_sit_in_their_block(tiny_job):
    job = LRMILJob(tiny_job[0])
    assert job.factor == 4 and job.patch_size == 64
    for sid in list(job.slides)[:3]:
        lo, hi, links = job.grid(sid, 5.0), job.grid(sid, 20.0), job.links(sid)
        step = hi.step0
        for r, row in enumerate(links):
            for j in np.flatnonzero(row >= 0):
                b, a = divmod(int(j), 4)  # child j = b*f + a: column offset a, row offset b
                # an HR patch is a child iff its level-0 top-left lies in the LR footprint, at offset (a, b) steps
                assert np.abs(hi.coords[row[j]] - (lo.coords[r] + np.array([a, b]) * step)).max() <= 1


def test_pooled_blocks_of_the_lr_patch_show_the_hr_children(tiny_job):
    """Pool an LR patch's pixels per child block (as the student's grid is pooled) and compare each block with its
    HR child seen at LR resolution: the link table's order must match the pooled order, not its transpose."""
    job = LRMILJob(tiny_job[0])
    right, transposed = [], []
    for sid in list(job.slides)[:4]:
        lo, hi, links = job.grid(sid, 5.0), job.grid(sid, 20.0), job.links(sid)
        with open_slide(lo.slide_path, "auto") as slide:
            for r in np.flatnonzero((links >= 0).all(1)):
                lr_px = read_block(slide, lo, np.array([r]))[0]  # (64, 64, 3)
                hr_px = read_block(slide, hi, links[r])  # (16, 64, 64, 3) in child order
                grid = torch.from_numpy(lr_px).permute(2, 0, 1).float()[None]  # a "feature map" (1, 3, 64, 64)
                blocks = pool_children(grid, 4)[0].numpy()  # (16, 3): mean colour of each child's block
                child_means = hr_px.reshape(16, -1, 3).mean(1)
                order_t = np.arange(16).reshape(4, 4).T.ravel()
                right.append(np.abs(blocks - child_means).mean())
                transposed.append(np.abs(blocks - child_means[order_t]).mean())
    assert len(right) >= 3
    assert np.mean(right) < 1.0  # same pixels at two resolutions: mean colours agree to within a grey level
    assert np.mean(transposed) > 5 * np.mean(right)
