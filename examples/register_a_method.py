"""Register your own Avalanche plugin as a method: it then appears in `list`, `bench` and the test matrix.

Run: python examples/register_a_method.py
"""

from dataclasses import dataclass

from avalanche.training.plugins import SupervisedPlugin

from avalanche_merge.runner import load_experiment, run_experiment
from avalanche_merge.runner.suite import print_table
from avalanche_merge.strategies import register_plugin_method


@dataclass
class FreezeHeadConfig:
    """Freeze the classifier after the first experience (a toy method for the example)."""

    after_experience: int = 0

    def __post_init__(self) -> None:
        if self.after_experience < 0:
            raise ValueError(f"after_experience must be >= 0, got {self.after_experience}")


class FreezeHead(SupervisedPlugin):
    def __init__(self, after_experience: int) -> None:
        super().__init__()
        self.after = after_experience

    def after_training_exp(self, strategy, **kwargs):
        if strategy.experience.current_experience >= self.after:
            strategy.model.head.requires_grad_(False)


register_plugin_method("freeze_head", make_plugin=lambda ctx, cfg: FreezeHead(cfg.after_experience),
                       config_cls=FreezeHeadConfig, description="toy: freeze the head after experience k",
                       family="example", scenarios=("domain_incremental",))

config = load_experiment({"benchmarks": [{"name": "domain_mnist", "options": {"domains": ["rotate_90", "blur"]}}],
                          "methods": ["naive", "freeze_head"], "seeds": [0]})
print_table(run_experiment(config, "results/example_plugin")[1])
