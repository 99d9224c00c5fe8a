"""COCO (open-vocabulary split) and LVIS evaluation, results files and the resumable inference loop.

Heavy dependencies (pycocotools, lvis) are imported only when an evaluator runs.
"""
from .coco import evaluate_coco, ovd_split_category_ids, split_ap50
from .inference import Predictor, batch_predictor, evaluate_dataset, evaluate_results, run_inference
from .lvis import evaluate_lvis
from .report import format_metrics, markdown_table, write_metrics_json
from .results import ResultsError, load_results, validate_results

__all__ = ["evaluate_coco", "evaluate_lvis", "ovd_split_category_ids", "split_ap50", "Predictor",
           "batch_predictor", "evaluate_dataset", "evaluate_results", "run_inference", "format_metrics", "markdown_table",
           "write_metrics_json", "ResultsError", "load_results", "validate_results"]
