"""The benchmark's protocol (BenchConfig: the shared budget, decoding and scoring), the notebooks' configs
(the default and the smoke run) and where a benchmark keeps its rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cxpmrg_lib.bench.systems import BOOK_SEED_SYSTEMS, DEFAULT_SYSTEMS, REFERENCE, SYSTEMS
from cxpmrg_lib.presets import BACKBONE_STEPS, PROJECTION_LR, get_preset
from cxpmrg_lib.runs import dataset_dir
from cxpmrg_lib.stages.common import StageConfig
from cxpmrg_lib.stages.decoding import CHOICE_GRID, DECODING_CHOICES, GUIDANCE_SCALES, checkpoint_decoding


BACKBONE_PRETRAINING = ("labels", "contrastive", "none")


@dataclass
class BenchConfig(StageConfig):
    """The benchmark's settings (StageConfig's fields: data, preset, folders, training budget overrides)."""
    systems: list[str] | None = None     # slugs, run in this order (the reference first); None: DEFAULT_SYSTEMS
    val_studies: int = 64
    test_studies: int | None = None      # None: the whole test split
    num_beams: int = 3
    repetition_penalty: float = 2.0
    no_repeat_ngram_size: int = 3
    max_words: int = 100                 # report words the word-level systems supervise (R2Gen's MIMIC setting)
    min_word_count: int = 3              # a word enters their vocabulary when seen this often in training
    lm_epochs: float = 0                 # the LM swap: epochs of each fresh LM; 0: the budget of MambaXray-VL's LM
    speed_studies: int = 32              # generation reports/s and peak memory: measured on this many test studies
    redo: list[str] = field(default_factory=list)   # systems to train and score again (their cached run is deleted)
    jobs: int = 0                        # worker processes (cxpmrg_lib.util.parallel); 0: one per core on cpu, 1 on cuda
    n_boot: int = 1000
    earlier_epochs: float | None = None  # MambaXray-VL's earlier stages when they must be trained (smoke runs)
    checkpoint_every: int = 200
    projection_lr: float | None = PROJECTION_LR   # the frozen-LM systems' projection; None: the system's lr
    # The stand-in for the ImageNet backbones the from-scratch systems' papers start from (stages.backbone):
    # "labels" trains each such backbone to predict the training reports' findings first, "contrastive" with
    # stage 2's image-report loss; "none": from scratch (the old protocol); its steps (presets.BACKBONE_STEPS:
    # 600, 300 the old setting)
    backbone_pretraining: str = "labels"
    backbone_steps: int = BACKBONE_STEPS
    # How each trained system's test decoding is set (stages.decoding): "validation" chooses it from
    # CHOICE_GRID on the validation studies by the checkpoint rule (BLEU-4 + CE-F1), the same grid and rule
    # for every system; "fixed": num_beams / repetition_penalty / no_repeat_ngram_size above for all (the
    # old setting)
    decoding_choice: str = "validation"
    # Training seeds: every row is trained `seeds` times, with the training seeds seed, seed + 1, ...: the data
    # (and the test studies) stay the same, and only the initialisation, the data order and dropout change.
    # Not in the protocol: seed 0's rows keep their hashes and folders (bench_dir), and a benchmark with more
    # seeds reuses those of fewer.
    seeds: int = 1
    # The systems trained at every training seed; the others train at the first seed only (their rows carry one
    # seed, and the seed table and the claims say so). None: every system at every seed. Not in the protocol.
    seed_systems: list[str] | None = None

    preset_defaults = "stage3"

    def __post_init__(self):
        super().__post_init__()
        if self.backbone_pretraining not in BACKBONE_PRETRAINING:
            raise ValueError(f"backbone_pretraining must be one of {BACKBONE_PRETRAINING}, "
                             f"not {self.backbone_pretraining!r}")
        if self.decoding_choice not in DECODING_CHOICES:
            raise ValueError(f"decoding_choice must be one of {DECODING_CHOICES}, not {self.decoding_choice!r}")
        if self.seed_systems is not None and REFERENCE not in self.seed_systems:
            raise ValueError(f"seed_systems must hold the reference {REFERENCE!r}: every row is tested against "
                             "it in every seed")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a whole number of at least 1, not {self.seeds!r}")
        unknown = [s for s in list(self.systems or []) + list(self.redo) + list(self.seed_systems or [])
                   if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {unknown}; known: {list(SYSTEMS)}")

    def training_seeds(self) -> list[int]:
        """The training seeds of the replicates: seed, seed + 1, ... (`seeds` of them)."""
        return [self.seed + k for k in range(self.seeds)]

    def seed_configs(self) -> list["BenchConfig"]:
        """One benchmark per training seed, each a single-seed config (the rows it trains). Generation speed
        and memory are measured on the first seed's rows only (the cost table reads them): the other seeds'
        models have the same size and decoding, and each check is a beam decoding of `speed_studies` studies
        per row. `speed_studies` is not in the protocol, so this changes no row."""
        from dataclasses import replace

        return [replace(self, seed=s, seeds=1, **({} if k == 0 else {"speed_studies": 0, "systems": self.replicated()}))
                for k, s in enumerate(self.training_seeds())]

    def system_list(self) -> list[str]:
        """The slugs this benchmark runs, in order (`systems`, or DEFAULT_SYSTEMS)."""
        return list(self.systems or DEFAULT_SYSTEMS)

    def replicated(self) -> list[str]:
        """The systems trained at every training seed (seed_systems, in the benchmark's order)."""
        keep = set(self.seed_systems) if self.seed_systems is not None else None
        return [s for s in self.system_list() if keep is None or s in keep]

    def single_seed(self) -> list[str]:
        """The systems trained at the first seed only (empty with one seed, or when every system replicates)."""
        return [] if self.seeds < 2 else [s for s in self.system_list() if s not in self.replicated()]

    def decoding(self) -> dict:
        return {"num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty,
                "no_repeat_ngram_size": self.no_repeat_ngram_size}

    def validation_decoding(self) -> dict:
        """The decoding of every system's validations during training (stages.decoding.checkpoint_decoding)."""
        return checkpoint_decoding(self.decoding(), self.decoding_choice)

    def upstream_training(self) -> dict:
        """The preset's training settings of the runs the rows build on (stages 1-2, the report LMs): part
        of the protocol, so that a row is redone when the run it was fitted on would now be trained
        otherwise (a row made on a 53-step report LM is not reused once that LM gets 195 steps)."""
        preset = get_preset(self.preset)
        return {"stage1": preset.stage1, "stage2": preset.stage2, "report_lm": preset.lm_stage}

    def protocol(self) -> dict:
        """What makes two rows comparable: a row measured under another protocol is redone."""
        return {**self.payload("bench"), "train": self.train_settings(), "val_studies": self.val_studies,
                "test_studies": self.test_studies, "decoding": self.decoding(), "max_words": self.max_words,
                "min_word_count": self.min_word_count, "lm_epochs": self.lm_epochs, "n_boot": self.n_boot,
                "earlier_epochs": self.earlier_epochs, "upstream": self.upstream_training(),
                **({"projection_lr": self.projection_lr} if self.projection_lr is not None else {}),
                **self.pretraining_payload(),
                **({"decoding_choice": {"grid": CHOICE_GRID, "guidance": GUIDANCE_SCALES, "select": "bleu4 + ce_f1",
                                        "validation": self.validation_decoding()}}
                   if self.decoding_choice != "fixed" else {}),
                **({"backbone": {"pretraining": self.backbone_pretraining, "steps": self.backbone_steps}}
                   if self.backbone_pretraining != "none" else {})}


# The smoke run of the book (tests): a few systems, a few steps; 04_benchmark and 06_explore share it.
SMOKE_SYSTEMS = ["mambaxray-vl", "most-common", "transformer", "r2gen", "lm-gpt2"]
SMOKE_BUDGET = dict(epochs=1, val_studies=8, test_studies=16, earlier_epochs=1, n_boot=100, speed_studies=4,
                    lm_epochs=1, backbone_steps=4)


ALL = "all"     # as a list of systems: every system of the registry (the whole zoo, ablations and LM swap included)


def system_slugs(systems: str | list | None) -> list[str]:
    """Slugs of comma-separated text or a list; "all" (alone) stands for every registered system."""
    chosen = ([s.strip() for s in systems.split(",") if s.strip()] if isinstance(systems, str)
              else list(systems or []))
    if ALL in chosen:
        if chosen != [ALL]:
            raise ValueError(f"{ALL!r} stands for every system and goes alone, not with {chosen}")
        return list(SYSTEMS)
    return chosen


def notebook_config(dataset_root: str, dataset_kind: str = "auto", loader: dict | None = None, preset: str = "tiny",
                    run_root: str = "runs", seed: int = 0, device: str = "cpu", systems: str | list | None = "",
                    epochs: float = 0, lm_epochs: float = 0, smoke: bool = False, jobs: int = 0,
                    backbone_pretraining: str = "labels", decoding_choice: str = "validation",
                    backbone_steps: int = BACKBONE_STEPS, seeds: int = 1,
                    seed_systems: str | list | None = "all") -> BenchConfig:
    """The benchmark of the notebooks' parameters (04_benchmark runs it, 06_explore reads the same folder).
    `systems`: comma-separated slugs or a list, or "all" (every registered system); empty: the default list
    (the smoke list in a smoke run). `seeds`: training seeds per row (seed, seed + 1, ...; the phantom's data
    seed is `seed` whatever their number). `seed_systems`: the systems trained at every seed ("all": every
    system; "default": BOOK_SEED_SYSTEMS; or slugs), the others at the first seed only."""
    chosen = system_slugs(systems)
    if smoke and not chosen:
        chosen = list(SMOKE_SYSTEMS)
    budget = {"lm_epochs": lm_epochs, "backbone_steps": backbone_steps, **({"epochs": epochs} if epochs else {}),
              **(SMOKE_BUDGET if smoke else {})}
    return BenchConfig(dataset_root=dataset_root, dataset_kind=dataset_kind, preset=preset, run_root=run_root,
                       seed=seed, device=device, loader=loader or {}, systems=chosen or None, jobs=jobs,
                       backbone_pretraining=backbone_pretraining, decoding_choice=decoding_choice, seeds=int(seeds),
                       seed_systems=seed_system_slugs(seed_systems), **budget)


def seed_system_slugs(seed_systems: str | list | None) -> list[str] | None:
    """BenchConfig.seed_systems of a notebook parameter: "all" (or empty) None, every system at every seed;
    "default" the book's list (BOOK_SEED_SYSTEMS); else comma-separated slugs or a list."""
    if seed_systems in (None, "", ALL, [ALL]):
        return None
    if seed_systems == "default":
        return list(BOOK_SEED_SYSTEMS)
    return system_slugs(seed_systems)


# The smoke run's systems on a second dataset (the iu-phantom of 04_benchmark).
SMOKE_SECOND_SYSTEMS = ["most-common", "r2gen"]


PRETRAIN_ON = ("main", "own")


def for_dataset(config: BenchConfig, dataset_root: str, dataset_kind: str = "auto", systems: str | list | None = "",
                smoke: bool = False, jobs: int | None = None, pretrain_on: str = "main") -> BenchConfig:
    """The same protocol and budget on another dataset (04_benchmark's iu-phantom), with its own
    systems (empty: the default list; in a smoke run SMOKE_SECOND_SYSTEMS).

    `pretrain_on`: "main" starts MambaXray-VL (and every system built on the stage-2 encoder) from the
    earlier stages of `config`'s dataset, as the paper's IU X-Ray model starts from its CheXpert Plus
    pre-training; its stage 3 and its report LM train on the new dataset. "own" trains stages 1 and 2 on
    the new dataset too (the old setting: on the iu-phantom's 280 training studies stage 2 is 88 steps,
    and its encoder stays near chance).

    `jobs`: None is 1 when the work is one chain that waits for itself: with "own" (MambaXray-VL's stages 1,
    then 2, then 3; in a worker with half the cores it ran about twice as slowly, iu-phantom: 9 minutes
    against 5 in one process), and when at most one of the systems trains (the default iu-phantom list:
    MambaXray-VL, whose report LM and stage 3 follow each other, and the two floors); else config.jobs."""
    from dataclasses import replace

    if pretrain_on not in PRETRAIN_ON:
        raise ValueError(f"pretrain_on must be one of {PRETRAIN_ON}, not {pretrain_on!r}")
    chosen = list(SMOKE_SECOND_SYSTEMS) if smoke else system_slugs(systems)
    loader = {} if dataset_kind == "r2gen" else config.loader
    pretraining = (dict(pretrain_root=config.pretrain_root or config.dataset_root,
                        pretrain_kind=config.pretrain_kind if config.pretrain_root else config.dataset_kind,
                        pretrain_loader=config.pretrain_loader if config.pretrain_root else config.loader)
                   if pretrain_on == "main" else dict(pretrain_root=None, pretrain_loader=None))
    if jobs is None:
        trained = [s for s in (chosen or DEFAULT_SYSTEMS) if SYSTEMS[s].family != "floor"]
        jobs = config.jobs if pretrain_on == "main" and len(trained) > 1 else 1
    return replace(config, dataset_root=dataset_root, dataset_kind=dataset_kind, loader=loader,
                   systems=chosen or None, redo=[], jobs=jobs, **pretraining)


def bench_dir(config: BenchConfig) -> Path:
    """Where one training seed's benchmark lives: `bench/` for seed 0 (where every row lived before the
    benchmark had seeds, so those rows are reused), `bench/seed_<k>/` for seed k. Each holds that seed's
    results.csv, predictions/ and row runs."""
    root = dataset_dir(config.run_root, config.dataset_root, config.preset) / "bench"
    return root if config.seed == 0 else root / f"seed_{config.seed}"


def seed_dirs(config: BenchConfig) -> list[Path]:
    """The benchmark folders of every training seed of `config`, in seed order."""
    return [bench_dir(c) for c in config.seed_configs()]
