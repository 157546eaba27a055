from core.checks import Check
from core.registry import Module

from .code.cuda import Config, gpu_ready, run


def gpu_path_runs(cfg: Config) -> bool:
    return cfg.gpu and gpu_ready() is None


MODULE = Module(
    name="cuda",
    category="systems",
    title="GPU kernels on a CPU: tiled matmul, the roofline, FlashAttention forward and backward",
    summary="A blocked matmul and FlashAttention's online-softmax forward and recomputing backward over torch tiles, "
            "equal to A @ B and to naive attention and its autograd gradients in fp64; the HBM bytes each loop moves, "
            "counted as it loads tiles, against the closed forms (naive 2mnk vs tiled mnk(1/B_n + 1/B_m); 4Nd + 4N^2 vs "
            "Theta(N^2 d^2 / M)); this CPU's roofline measured; the same kernels in Triton on a CUDA device.",
    interview_weight=4,
    interview_outcome="Count the bytes a naive and a tiled matmul move and place them on a roofline; write the online "
                      "softmax update and FlashAttention's forward and backward loops, say why nothing N x N is stored and "
                      "what the traffic becomes; quote your run's errors, byte counts and measured ridge point.",
    presets={
        "toy": Config(matmul_m=100, matmul_n=72, matmul_k=84, tile_sweep=(1, 4, 16, 64), sweep_size=64,
                      roofline_sizes=(8, 32, 128, 512), seconds_per_size=0.2, copy_mb=64, seq_len=130,
                      sram_sweep=(2048, 8192, 32768), sweep_seq_len=512),
        "default": Config(),
    },
    run=run,
    threads=1,  # the roofline is measured on one core; the tile loops are too small to split
    metrics={
        "matmul_max_err": "max |tiled_matmul(A, B) - A @ B| in fp64, ragged last tiles included",
        "matmul_bytes": "bytes (fp32) the tiled matmul loads and stores, counted tile by tile in its loops",
        "matmul_bytes_formula": "the closed form: 4 (m k ceil(n / B_n) + k n ceil(m / B_m) + m n)",
        "naive_matmul_bytes": "bytes the naive kernel moves (the same loops with 1 x 1 output tiles: a row and a column "
                              "per output element), counted",
        "naive_matmul_bytes_formula": "the closed form: 4 (2 m n k + m n)",
        "matmul_intensity": "FLOPs per byte of the tiled matmul: 2 m n k / matmul_bytes",
        "naive_matmul_intensity": "FLOPs per byte of the naive kernel (about 1/4 in fp32)",
        "tile_fast_memory_bytes": "fast memory one tile holds: an A tile, a B tile and the C accumulator (fp32)",
        "flops_rise_over_10x": "1 when torch.matmul's measured FLOP/s at the largest roofline size is at least 10x that at "
                               "the smallest (the measured numbers are in run.json's timings), else 0",
        "attention_max_err": "max |difference| of FlashAttention's output and logsumexp from naive softmax(QK^T/sqrt(d))V, "
                             "fp64, causal and not",
        "attention_backward_max_err": "max |difference| of FlashAttention's dQ, dK, dV from autograd through naive "
                                      "attention, fp64, causal and not",
        "flash_bytes": "HBM bytes the flash forward moves (non-causal), counted as its loops load Q, K, V tiles and "
                       "store O and L",
        "flash_bytes_formula": "the closed form: 4 heads (2 N d + 2 N d ceil(N / B_r) + N)",
        "flash_causal_bytes": "the same for the causal forward, which skips key blocks past each query block",
        "flash_causal_bytes_formula": "the closed form for the causal forward: 4 heads (2 N d + N + 2 d x the key rows "
                                      "of the whole key blocks each query block loads)",
        "naive_attention_bytes": "HBM bytes of standard attention (S and P written and read back), counted",
        "naive_attention_bytes_formula": "the closed form: 4 heads (4 N d + 4 N^2)",
        "attention_traffic_saving": "naive_attention_bytes / flash_bytes at the configured blocks",
        "sram_sweep_mismatch": "largest |counted - formula| of the flash traffic over the SRAM sweep (elements)",
        "sram_sweep_best_saving": "naive / flash traffic at the largest SRAM of the sweep",
        "gpu_available": "1 when the Triton kernels ran on a CUDA device, 0 when skipped",
        "gpu_matmul_rel_err": "Triton matmul, fp16: max |C - C_fp32| / max |C_fp32| (NaN when no GPU)",
        "gpu_matmul_torch_rel_err": "the same for torch.matmul (cuBLAS): the baseline",
        "gpu_attention_max_err": "Triton flash forward, fp16: max |difference| of O and L from fp32 math-backend "
                                 "attention (NaN when no GPU)",
        "gpu_attention_torch_max_err": "the same for F.scaled_dot_product_attention in fp16: the baseline",
    },
    checks=[
        Check("matmul_max_err", "<=", 1e-9,
              why="the tiled matmul equals A @ B in fp64 (rounding: about 1e-13); a tile the loops miss stays NaN"),
        Check("matmul_bytes", "==", ref="matmul_bytes_formula",
              why="the bytes counted tile by tile equal m k ceil(n/B_n) + k n ceil(m/B_m) + m n elements exactly"),
        Check("naive_matmul_bytes", "==", ref="naive_matmul_bytes_formula",
              why="one output element per thread reads a row and a column: 2 m n k + m n elements exactly"),
        Check("flops_rise_over_10x", "==", 1.0,
              why="torch.matmul's FLOP/s rise at least 10x from the smallest size to the largest (measured about 100x): "
                  "small matmuls are overhead- and memory-bound, large ones compute-bound"),
        Check("attention_max_err", "<=", 1e-6,
              why="FlashAttention's O and logsumexp equal naive attention in fp64 (rounding: about 1e-15), causal and not"),
        Check("attention_backward_max_err", "<=", 1e-6,
              why="the recomputing backward's dQ, dK, dV equal autograd through naive attention in fp64"),
        Check("flash_bytes", "==", ref="flash_bytes_formula",
              why="the flash forward's counted HBM traffic equals 2 N d + 2 N d ceil(N/B_r) + N per head exactly"),
        Check("flash_causal_bytes", "==", ref="flash_causal_bytes_formula",
              why="the causal forward loads exactly the key blocks up to each query block's last query"),
        Check("naive_attention_bytes", "==", ref="naive_attention_bytes_formula",
              why="standard attention moves 4 N d + 4 N^2 elements per head: S and P each written and read once"),
        Check("sram_sweep_mismatch", "==", 0.0,
              why="the counted flash traffic equals the formula at every SRAM size of the sweep (every block size)"),
        Check("gpu_matmul_rel_err", "<=", 2e-3, when=gpu_path_runs,
              why="on a CUDA device the Triton matmul equals the fp32 product within fp16 output rounding (about 5e-4); "
                  "skipped without one"),
        Check("gpu_attention_max_err", "<=", 1e-2, when=gpu_path_runs,
              why="on a CUDA device the Triton flash forward equals fp32 attention within fp16 error; skipped without one"),
    ],
)
