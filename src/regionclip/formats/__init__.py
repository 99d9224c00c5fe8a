"""One file-format layer: COCO results, the resumable results journal, output formats, adapters, user boxes.

* :mod:`.coco` - :func:`detections_to_coco` / :func:`coco_to_detections` (COCO results dicts, RLE masks);
* :mod:`.results` - :class:`ResultsWriter` (streaming, resumable JSONL journal -> results JSON + images.json),
  :func:`read_journal`, :func:`merge_journals`, :func:`write_results`;
* :mod:`.exports` - ``detect --format jsonl|csv|yolo`` writers (``add(key, det)`` / ``close()``), their parsers,
  and :func:`export_journal`;
* :mod:`.adapters` - ``supervision.Detections`` and Hugging Face pipeline output, both directions;
* :mod:`.boxes` - user boxes: :func:`read_boxes_file`, :func:`match_boxes`, :func:`validate_user_boxes`.
"""
from .adapters import from_hf, from_supervision, to_hf, to_supervision
from .box_files import BadBoxesError, BoxesFileError, box_problem, match_boxes, read_boxes_file, validate_user_boxes
from .coco_json import ResultsError, categories, coco_to_detections, decode_masks, detections_to_coco, encode_masks
from .exports import (
                    FORMATS,
                    CsvWriter,
                    FormatWriter,
                    JsonlWriter,
                    YoloWriter,
                    export_journal,
                    open_writer,
                    read_csv,
                    read_jsonl,
                    read_yolo,
                    write_csv,
                    write_jsonl,
                    write_yolo,
)
from .journal import (
                    JOURNAL_NAME,
                    ImageEntry,
                    Journal,
                    JournalError,
                    ResultsWriter,
                    make_meta,
                    merge_journals,
                    read_journal,
                    write_results,
)

__all__ = [
    "BadBoxesError", "BoxesFileError", "CsvWriter", "FORMATS", "FormatWriter", "ImageEntry", "JOURNAL_NAME",
    "Journal", "JournalError", "JsonlWriter", "ResultsError", "ResultsWriter", "YoloWriter", "box_problem",
    "categories", "coco_to_detections", "decode_masks", "detections_to_coco", "encode_masks", "export_journal",
    "from_hf", "from_supervision", "make_meta", "match_boxes", "merge_journals", "open_writer", "read_boxes_file",
    "read_csv", "read_journal", "read_jsonl", "read_yolo", "to_hf", "to_supervision", "validate_user_boxes",
    "write_csv", "write_jsonl", "write_results", "write_yolo",
]
