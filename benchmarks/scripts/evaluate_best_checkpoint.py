# Test metrics of the best-so-far checkpoint of an unfinished baseline run of `fpt-monai accuracy`.
# Run: .venv/bin/python benchmarks/scripts/evaluate_best_checkpoint.py <work_dir>/full  (dataset path inside)
# Test metrics of the best-so-far checkpoint of an unfinished run (cut off by the session's end).
import json, sys
from monai.bundle import ConfigWorkflow
from fpt_monai.bundle import bundle_dir, config_files, demo_config_names
work = sys.argv[1]
common = {"bundle_root": work, "method": "full", "dataset_dir": "/tmp/s5/acc512/data/fpt_sample", "num_epochs": 20,
          "checkpoints": {"best": work + "/models/model.pt"}, "output_dir": work + "/eval_partial"}
ev = ConfigWorkflow(config_file=config_files(*demo_config_names("full", evaluate=True)), meta_file=config_files("metadata")[0],
                    logging_file=str(bundle_dir() / "configs" / "logging.conf"), run_id="evaluating", workflow_type=None, **common)
ev.initialize(); r = ev.run()[0]; ev.finalize()
print(json.dumps(r))
