"""The generated tasks of the reference LLaVA and of the which-came-first video reference."""
import torch

from benchmarks import tasks


# --------------------------------------------------------------------------------------- which came first
def test_when_task_is_deterministic_given_seed_and_balanced():
    x1, y1 = tasks.when_batch(8, seed=3)
    x2, y2 = tasks.when_batch(8, seed=3)
    x3, _ = tasks.when_batch(8, seed=4)
    assert x1.shape == (8, tasks.VIDEO_FRAMES, 3, tasks.VIDEO_SIZE, tasks.VIDEO_SIZE)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.min() >= -1 and x1.max() <= 1
    counts = torch.bincount(tasks.when_labels(tasks.when_params(4000, 0)), minlength=tasks.WHEN_CLASSES)
    assert counts.min() > 900  # four quadrants, about 1000 each


def test_reversed_when_clip_is_the_flipped_clip_with_another_label():
    p = tasks.when_params(64, seed=5)
    q = tasks.reverse_when_params(p)
    assert torch.equal(tasks.render_when(q), tasks.render_when(p).flip(1))
    assert (tasks.when_labels(q) != tasks.when_labels(p)).all()  # the other flash comes first now


def test_each_flash_fills_exactly_one_token_and_the_two_look_alike():
    # With tubelets of 2 frames and 4 x 4 patches, each flash is one token; the two flash tokens hold the same
    # pixels (up to noise), and they are in different tubelets and different quadrants.
    p = tasks.when_params(32, seed=6)
    p["noise"] = torch.zeros_like(p["noise"])
    x = tasks.render_when(p)  # [B, T, 3, 32, 32]
    tokens = x.view(32, 4, 2, 3, 8, 4, 8, 4).permute(0, 1, 4, 6, 2, 3, 5, 7).reshape(32, 4 * 8 * 8, -1)
    yellow = torch.tensor([0.95, 0.9, 0.1]) * 2 - 1
    is_flash = (tokens.view(32, 256, 2, 3, 16) - yellow.view(1, 1, 1, 3, 1)).abs().amax((2, 3, 4)) < 1e-5
    assert torch.equal(is_flash.sum(1), torch.full((32,), 2))
    for b in range(32):
        i, j = torch.nonzero(is_flash[b]).flatten().tolist()
        assert torch.equal(tokens[b, i], tokens[b, j])
        assert i // 64 == int(p["first_t"][b]) and j // 64 == int(p["second_t"][b])
    assert (p["first_t"] < p["second_t"]).all()
    half = 4
    quad = lambda r, c: 2 * (r >= half).long() + (c >= half).long()
    assert (quad(p["first_row"], p["first_col"]) != quad(p["second_row"], p["second_col"])).all()


# ------------------------------------------------------------------------------------------ visual questions
def test_vqa_batch_is_deterministic_and_well_formed():
    x1, q1, a1 = tasks.vqa_batch(16, seed=2)
    x2, q2, a2 = tasks.vqa_batch(16, seed=2)
    assert x1.shape == (16, 3, tasks.VQA_SIZE, tasks.VQA_SIZE) and q1.shape == (16, tasks.VQA_QUESTION)
    assert torch.equal(x1, x2) and torch.equal(q1, q2) and torch.equal(a1, a2)
    assert not torch.equal(x1, tasks.vqa_batch(16, seed=3)[0])
    assert (tasks.VQA_SIZE // tasks.VQA_CELL) ** 2 >= 144


def test_vqa_answers_follow_the_scene():
    p = tasks.vqa_params(400, seed=1)
    cells, answers, q = p["cells"], tasks.vqa_answers(p), tasks.vqa_questions(p)
    words = [[tasks.VQA_VOCAB[i] for i in row] for row in q.tolist()]
    for b in range(400):
        grid = cells[b].view(tasks.VQA_GRID, tasks.VQA_GRID)
        kind, arg1, arg2 = words[b][:3]
        answer = tasks.VQA_VOCAB[int(answers[b])]
        if kind == "colour":
            colour = int(grid[int(arg1[3:]), int(arg2[3:])])
            assert colour >= 0 and answer == tasks.VQA_COLOURS[colour]
        elif kind == "count":
            assert arg1 == "shapes" and answer == str(int((cells[b] == tasks.VQA_COLOURS.index(arg2)).sum()))
        else:
            cols = [torch.nonzero(grid == tasks.VQA_COLOURS.index(c))[:, 1] for c in (arg1, arg2)]
            assert len(cols[0]) == 1 and len(cols[1]) == 1 and cols[0] != cols[1]  # unique, different columns
            assert answer == ("yes" if cols[0] < cols[1] else "no")
    kinds = torch.bincount(p["kind"], minlength=3)
    assert kinds.min() > 100


def test_vqa_shapes_sit_inside_their_cell():
    # Every shape is drawn inside its own 4 x 4 cell (one visual token); empty cells are background only.
    p = tasks.vqa_params(8, seed=4)
    p["noise"] = torch.zeros_like(p["noise"])
    x = tasks.render_vqa(p)  # [8, 3, 48, 48]
    G, P = tasks.VQA_GRID, tasks.VQA_CELL
    cells = x.view(8, 3, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(8, G * G, 3, P * P)
    background = (p["background"] - 0.5) / 0.5
    plain = (cells - background.view(8, 1, 1, 1)).abs().amax((2, 3)) < 1e-6  # [8, 144] cell is all background
    assert torch.equal(plain, p["cells"] < 0)


def test_vqa_answer_needs_the_image():
    # The same question has different answers on different images, for every kind of question.
    p = tasks.vqa_params(2000, seed=9)
    q, a = tasks.vqa_questions(p), tasks.vqa_answers(p)
    for kind in range(3):
        rows = p["kind"] == kind
        qs, ans = q[rows], a[rows]
        first = qs[0]
        same = (qs == first).all(1)
        if same.sum() > 3:
            assert len(ans[same].unique()) > 1
        assert len(ans.unique()) > 1
