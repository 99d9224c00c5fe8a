"""Per-stage GPU time of one batch (RN50, batch 8, RPN-1000): RPN, trunk, region head, classify+post-process, and
a profiler table of the RPN. Prints; asserts nothing.  python benchmarks/gpu_stages.py"""
import sys
import time
import types
import torch
try:
    import ftfy  # noqa
except ImportError:
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda s: s)
from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig, PostprocessConfig, RPNConfig
from regionclip.factory import build_detector
from regionclip.modeling.fusion import fused_for_inference
from regionclip.pipeline import Pipeline, RunOptions
from regionclip.structures import PreparedImage
from regionclip.text.vocabulary import Vocabulary
dev = torch.device("cuda"); g = torch.Generator().manual_seed(0)
det = build_detector(DetectorConfig(clip=ClipResNetConfig.rn50(), rpn=RPNConfig.fpn(nms_thresh=0.9, post_nms_topk=1000))).eval().to(dev)
det = fused_for_inference(det)
pipe = Pipeline(det, InputConfig()); vocab = Vocabulary.create(torch.randn(1203, 1024, generator=g)).to(dev)
for bs, dtype in ((8, "bfloat16"), (8, "float32")):
    imgs = [PreparedImage(torch.randint(0, 255, (3, 750, 1333), dtype=torch.uint8, generator=g).to(dev), (1080, 1920), (750, 1333)) for _ in range(bs)]
    opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.02, detections_per_image=300), dtype=dtype, chunk_size=4096, skip_unreachable=False)
    def T(f):
        torch.cuda.synchronize(); t=time.perf_counter(); r=f(); torch.cuda.synchronize(); return r, time.perf_counter()-t
    for rep in range(2):
        props, tp = T(lambda: pipe.proposals(imgs, opts))
        feats, tf = T(lambda: pipe.features(imgs, opts))
        emb, te = T(lambda: pipe.encode(feats, [p.boxes for p in props], opts))
        _, td = T(lambda: pipe.detect_prepared(imgs, vocab, opts, regions=props, features=feats))
    print(f"bs {bs} {dtype}: rpn {tp:.3f}s trunk {tf:.3f}s head {te:.3f}s ({sum(len(p.boxes) for p in props)} regions) detect_prepared(given rpn+features) {td:.3f}s")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    pipe.proposals(imgs, opts); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=40))
