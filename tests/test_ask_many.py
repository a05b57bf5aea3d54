"""minimm.chat.ask_many, the final evaluation's batched greedy answers: the same answers as ask() one by one."""
import torch

from minimm.audio import load_audio_features
from minimm.chat import ask, ask_many, load_model
from minimm.vit import load_image


def test_ask_many_equals_ask_one_by_one(tiny_run):
    model, tok, ckpt = load_model(tiny_run.out_dir, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # 8 training steps answer every prompt alike; noise makes each answer its own
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    size, resize = model.vision.config.image_size, ckpt["config"]["resize"]
    pictures = {name: load_image(path, size, resize) for name, path in tiny_run.images.items()}
    clips = {name: load_audio_features(path).T for name, path in tiny_run.wavs.items()}
    # per task: prompts of equal length (one batch, split in two by batch_size=2) and of other lengths
    cases = {
        "image": [([("user", f"<image>\n{q}")], [pictures[name]], [])
                  for q, name in [("What color is it?", "red"), ("What color is it?", "green"),
                                  ("What color is it?", "blue"), ("Which color?", "red"), ("Say it.", "blue")]],
        "audio": [([("user", f"<audio>\n{q}")], [], [clips[name]])
                  for q, name in [("Which tone?", "red"), ("Which tone?", "blue"), ("Which tone is it?", "green")]],
        "text": [([("user", q)], [], []) for q in ("Say 4.", "Say 11.", "Say 7.", "Say it again, 9.")],
    }
    for task, asked in cases.items():
        one_by_one = [ask(model, tok, task, turns, 24, temperature=0.0, images=images, audio=audio)
                      for turns, images, audio in asked]
        together = ask_many(model, tok, task, [turns for turns, _, _ in asked], 24,
                            images=[images for _, images, _ in asked], audio=[audio for _, _, audio in asked],
                            batch_size=2)
        assert together == one_by_one, task
        assert len(set(one_by_one[:2])) == 2, one_by_one  # two prompts of one batch, two answers
