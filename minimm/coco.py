"""COCO caption files, read as image examples: the captioned pictures a vision learner most often has on disk.

What this file teaches:
- The layout of COCO Captions (Chen et al. 2015, "Microsoft COCO Captions: Data Collection and Evaluation
  Server", https://arxiv.org/abs/1504.00325): one JSON object per split, `captions_train2017.json` and the like,
  whose "images" list each picture once (its "id" and "file_name") and whose "annotations" hold the captions,
  about five per picture, each naming its picture by "image_id". Unlike LLaVA's files the text and the picture
  meet only through that id, so the reader indexes the pictures first and then walks the captions.
- Caption pairs as instruction data: LLaVA's first stage (Liu et al. 2023, https://arxiv.org/abs/2304.08485,
  section 4.1) trains the projector on image-caption pairs turned into a question with a brief-description
  instruction and the caption as the answer. Each caption here becomes one {"text", "image", "response"} record
  with the question CAPTION_QUESTION, and from there it is read like any other record (minimm/formats.py): the
  `<image>` marker goes before the question, a missing picture is reported with its place and skipped.
- Failing clearly on the wrong COCO file: instances_*.json and person_keypoints_*.json have the same two lists,
  but their annotations are boxes and outlines, not captions; reading one is an error that says so.

A caption's place in error messages is `file:N`, N counting the annotations from 1 (as a .json array's element
number stands in for its line).
"""
from __future__ import annotations

from typing import Any, Iterator

CAPTION_QUESTION = "Describe the image briefly."


def is_coco_captions(data: Any) -> bool:
    """Whether a loaded .json file is COCO-style: an object holding "images" and "annotations"."""
    return isinstance(data, dict) and "images" in data and "annotations" in data


def caption_records(data: dict, path: str) -> Iterator[tuple[str, dict | tuple[str, str]]]:
    """Yield (source, record) per caption: record is a {"task", "text", "image", "response"} dict, or for a
    caption that cannot become one, (reason, message) for the reader to count and report."""
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(f"{path}: COCO's 'images' and 'annotations' must both be lists")
    file_of = {image["id"]: image["file_name"] for image in images
               if isinstance(image, dict) and isinstance(image.get("file_name"), str) and "id" in image}
    if annotations and not any(isinstance(a, dict) and "caption" in a for a in annotations):
        raise ValueError(f"{path}: COCO annotations without captions (an instances or keypoints file?); "
                         f"minimm reads the caption files, such as captions_train2017.json")
    for i, annotation in enumerate(annotations):
        source = f"{path}:{i + 1}"
        if not isinstance(annotation, dict):
            yield source, ("not an object", f"{source}: annotation is not a JSON object")
            continue
        caption, image_id = annotation.get("caption"), annotation.get("image_id")
        if not isinstance(caption, str):
            yield source, ("wrong type", f"{source}: 'caption' must be a string, not {type(caption).__name__}")
        elif image_id not in file_of:
            yield source, ("unknown image", f"{source}: image_id {image_id!r} is not among the file's 'images'")
        else:
            yield source, {"task": "image", "text": CAPTION_QUESTION, "image": file_of[image_id],
                          "response": caption.strip()}
