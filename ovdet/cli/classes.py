"""`ovdet classes show|encode`: check a class specification, precompute its text embeddings into the cache."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ovdet.cli import HelpFormatter
from ovdet.cli._common import add_trust_option
from ovdet.util.display import shown
from ovdet.options import REDUCTIONS

if TYPE_CHECKING:
    from ovdet.text.prompts import ClassSpec

_SPEC_HELP = ('a class file (.yaml/.yml/.json) or a comma-separated list with inline syntax, e.g. '
              '"person|man|woman,helmet,!reflection" (| joins synonyms, ! marks a negative prompt)')


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `classes` command and its two actions."""
    parser = sub.add_parser("classes", help="show a class specification or precompute its embeddings",
                            description="Parse class specifications and fill the embedding cache.",
                            formatter_class=HelpFormatter)
    actions = parser.add_subparsers(dest="classes_action", metavar="ACTION")
    actions.required = True
    for name, help_text in (("show", "print the parsed classes: name, threshold, phrasings, negatives"),
                            ("encode", "encode every prompt into the embedding cache, so later runs skip the "
                                       "text tower")):
        action = actions.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=HelpFormatter)
        action.add_argument("spec", metavar="FILE_OR_LIST", help=_SPEC_HELP)
        action.add_argument("--templates", action=argparse.BooleanOptionalAction, default=None,
                            help="average each phrasing over the default prompt templates; unset: as the file says, "
                                 "else off")
        action.add_argument("--reduce", choices=REDUCTIONS, default=None,
                            help="how a class's phrasings combine; unset: as the file says, else max")
        if name == "encode":
            action.add_argument("--text-model", default=None,
                                help="text tower: Hugging Face id, folder or OpenAI ViT-B-32.pt; unset: the tower "
                                     "in --model's checkpoint, else CLIP ViT-B/32")
            action.add_argument("--model", default=None,
                                help="detector whose embedded text tower to use (e.g. an `ovdet train` "
                                     "checkpoint); unset: only --text-model matters")
            action.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
            action.add_argument("--save", default=None, metavar="FILE.npy",
                                help="also write the embeddings as a float32 [rows, dim] NumPy file, one row per "
                                     "phrasing (negatives last): the txt_feats input of an exported live graph")
            add_trust_option(action)
    return parser


def _encode(args: argparse.Namespace, spec: ClassSpec) -> int:
    from ovdet.text.cache import EmbeddingCache, LazyTextEncoder
    from ovdet.util.device import select_device

    texts, cache = spec.texts(), EmbeddingCache()
    detector = None
    if spec.exemplars and args.model is None:
        from ovdet.errors import ClassSpecError

        raise ClassSpecError(f"{len(spec.exemplars)} exemplar(s) in the spec: exemplars are embedded by a detector, "
                             "so add --model (the one that will detect with them, e.g. --model demo).")
    if args.model is not None:
        from ovdet.config import DetectorConfig
        from ovdet.detector import OVDetector

        detector = OVDetector.from_config(DetectorConfig(model=args.model, text_model=args.text_model,
                                                         device=args.device, trust_weights=args.trust_weights))
        identity = detector.text_identity
        cached = len(cache.get(identity, texts))
        detector.set_classes(spec)
    else:
        tower = LazyTextEncoder(args.text_model, device=select_device(args.device), cache=cache)
        identity = tower.identity
        cached = len(cache.get(identity, texts))
        tower.encode(texts)
    print(f"{len(texts)} prompt(s) for {len(spec.classes)} class(es): {cached} already cached, "
          f"{len(texts) - cached} encoded with {shown(identity)}")
    if spec.exemplars:
        print(f"{len(spec.exemplars)} exemplar(s) embedded by {shown(detector.model_id)} (cached)")
    print(f"cache: {shown(cache.root)}")
    if args.save:
        _save(args, spec, cache, detector)
    return 0


def _save(args: argparse.Namespace, spec: ClassSpec, cache, detector=None) -> None:
    """Write spec's embedding rows (all cached by now) to args.save."""
    import numpy as np

    from ovdet.text.cache import LazyTextEncoder

    state = None
    if args.model is not None and not str(args.model).endswith((".yaml", ".yml")):
        from ovdet.weights.checkpoint import TEXT_ENCODER_KEY
        from ovdet.weights.registry import resolve_detector
        from ovdet.model.world import load_world_checkpoint

        state = load_world_checkpoint(resolve_detector(args.model), trust_weights=args.trust_weights)[1] \
            .get(TEXT_ENCODER_KEY)
    tower = LazyTextEncoder(args.text_model, device="cpu", embedded_state=state, cache=cache)
    encode_exemplars = None
    if spec.exemplars and detector is not None:  # cached by now, like the prompts
        from ovdet.model.exemplar_encoder import ExemplarEncoder

        encode_exemplars = ExemplarEncoder(detector.world, lambda: detector.imgsz, cache, args.text_model,
                                           embedded_tower=state is not None).encode
    rows = spec.embed(tower.encode, encode_exemplars)
    np.save(args.save, rows)
    names = [f"{phrase}" + (" (negative)" if column < 0 else "") for phrase, column in spec.columns]
    print(f"embeddings [{rows.shape[0]}, {rows.shape[1]}] -> {shown(args.save)}  (rows: {shown(', '.join(names))})")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    from ovdet.text.prompts import parse_classes

    spec = parse_classes(args.spec, templates=args.templates, reduce=args.reduce)
    if args.classes_action == "show":
        print(spec.describe())
        return 0
    return _encode(args, spec)
