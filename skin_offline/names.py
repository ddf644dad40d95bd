"""Every name shared by the exporter and the runtime: ONNX I/O names, bundle file names, manifest keys.

Defined once here so neither side rewrites names by string replacement.
"""

SCHEMA_VERSION = 1

# --- bundle files -----------------------------------------------------------------------------
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
VISION_GRAPH = "vision.onnx"
DECODER_GRAPH = "decoder.onnx"
DECODER_CONTRIB_GRAPH = "decoder_contrib.onnx"  # onnxruntime contrib-op decoder (Flavor.CONTRIB)
EMBEDDINGS = "embed_tokens.npy"  # [vocab, hidden] table, memory-mapped by the runtime


def external_data_name(graph_file: str) -> str:
    return graph_file + ".data"


# --- vision graph I/O -------------------------------------------------------------------------
PIXEL_VALUES = "pixel_values"  # [B, 3, S, S] float32, normalised
IMAGE_FEATURES = "image_features"  # [B, N_img, H_text] projected patch features

# --- decoder graph I/O ------------------------------------------------------------------------
INPUTS_EMBEDS = "inputs_embeds"  # [B, S, H]
ATTENTION_MASK = "attention_mask"  # [B, P+S] int64, 1 = attend
POSITION_IDS = "position_ids"  # [B, S] int64
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"  # [] int64: logits for the last k positions only
LOGITS = "logits"  # [B, k, V]


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"  # [B, kvH, P, D]


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"  # [B, kvH, P+S, D]


def present_value(i: int) -> str:
    return f"present.{i}.value"


# --- manifest keys ----------------------------------------------------------------------------
K_SCHEMA = "schema_version"
K_MODEL = "model"
K_PREPROCESS = "preprocess"
K_PROMPT = "prompt"
K_TOKENS = "tokens"
K_GRAPHS = "graphs"
K_FILES = "files"
K_SOURCE = "source"
K_EXPORTER = "exporter"
K_VERIFICATION = "verification"
K_QUALITY = "quality"

# random-weight checkpoints (export/factory.py) mark themselves in config.json; export copies the mark to
# manifest["source"], and every front end warns that such a bundle's answers mean nothing
CKPT_RANDOM_WEIGHTS = "skin_offline_random_weights"
SOURCE_RANDOM_WEIGHTS = "random_weights"

# graph roles inside manifest["graphs"]
ROLE_VISION = "vision"
ROLE_DECODER = "decoder"
ROLE_EMBEDDINGS = "embeddings"


# --- precision variants (quantize) ------------------------------------------------------------
def variant_file(base: str, precision: str) -> str:
    """File name of a graph/table variant: ("decoder.onnx", "int4") -> "decoder.int4.onnx"; fp32 keeps `base`."""
    if precision == "fp32":
        return base
    stem, dot, ext = base.rpartition(".")
    return f"{stem}.{precision}.{ext}" if dot else f"{base}.{precision}"


def embedding_scales_file(precision: str) -> str:
    """Per-row scales [V] float32 next to an int8 embedding table."""
    return variant_file(EMBEDDINGS, precision).removesuffix(".npy") + ".scales.npy"


# MatMulNBits initializer suffixes (packed weights, block scales, zero points)
Q_WEIGHT_SUFFIX = "_Q{bits}"
Q_SCALES_SUFFIX = "_scales"
Q_ZERO_POINTS_SUFFIX = "_zero_points"
QGEMM_WEIGHT_SUFFIX = "_QGEMM8"  # int8 [K,N] per-column codes (DynamicQuantizeMatMul)
QGEMM_SMOOTH_SUFFIX = (
    "_smooth"  # fp32 [K] per-input-channel divisors of a smoothed QGEMM weight (codecs.smooth_factors)
)


def kernel_variant_file(base: str, precision: str, kernel: str) -> str:
    """A graph variant that differs from `variant_file(base, precision)` by its weight kernel:
    ("decoder.onnx", "int8", "qgemm") -> "decoder.int8-qgemm.onnx"."""
    return variant_file(base, f"{precision}-{kernel}")


# --- graph metadata ---------------------------------------------------------------------------------------
# metadata_props key of a decoder graph: JSON {"layers": [{"in": [...], "out": [...]}, ...], "head_in": [...]}: per
# layer the tensors whose sum is the hidden state entering / leaving it (the contrib graph carries it as two
# halves of a fused residual add), and those entering the final norm + lm_head. Verification cuts the graph
# there to run one layer at a time (export/subgraph.py).
GRAPH_LAYERS_KEY = "skin_offline.layer_boundaries"
