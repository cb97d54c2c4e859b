# A C++ attention kernel that also returns the column sums (token importance), against the extraction's per-head
# loop and PyTorch's fused attention: one ViT-B/16 block at 512 (12 heads, 1025 tokens), one image.
# The kernel runs one (image, head) per task over PyTorch's threads, the score blocks through MKL's sgemm_ (exported
# by x86 PyTorch wheels) and one fused, vectorised pass for the softmax and the column sums. Arms: ext<rows> is the
# kernel with query blocks of that many rows; "gemms" is both matrix products alone (mode 2 + the context product),
# "softmax_av" the softmax pass with the context product, "av" the context product alone.
# Needs g++ and ninja; JIT-compiled into /tmp/fpt_attention_kernel.
# Run: .venv/bin/python benchmarks/scripts/attention_kernel_cpp.py
import time, torch, statistics, os
import torch.nn.functional as F
from torch.utils.cpp_extension import load_inline
from fpt_monai.networks.backbones import FrozenViTBackbone
src = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);


#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
using Vec = at::vec::Vectorized<float>;
static void softmax_rows_and_sum_columns(float* s, int64_t rows, int64_t n, float* colsum) {
  const int64_t W = Vec::size();
  const int64_t nv = n - n % W;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * n;
    Vec vmax(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < nv; j += W) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
    float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    for (int64_t j = nv; j < n; ++j) m = std::max(m, row[j]);
    Vec vm(m), vsum(0.f);
    for (int64_t j = 0; j < nv; j += W) { Vec e = (Vec::loadu(row + j) - vm).exp_u20(); e.store(row + j); vsum = vsum + e; }
    float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
    for (int64_t j = nv; j < n; ++j) { float e = std::exp(row[j] - m); row[j] = e; total += e; }
    const float inv = 1.f / total; Vec vinv(inv);
    for (int64_t j = 0; j < nv; j += W) { Vec p = Vec::loadu(row + j) * vinv; p.store(row + j); (Vec::loadu(colsum + j) + p).store(colsum + j); }
    for (int64_t j = nv; j < n; ++j) { float p = row[j] * inv; row[j] = p; colsum[j] += p; }
  }
}
std::vector<at::Tensor> attend_and_rank(at::Tensor q, at::Tensor k, at::Tensor v, double scale, int64_t block, bool with_context, int64_t mode) {
  const auto B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto importance = at::zeros({B, H, N}, q.options());
  auto context = with_context ? at::empty({B, H, N, D}, q.options()) : at::Tensor();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(block * N);
    const float alpha = scale, zero = 0.f, one_ = 1.f;
    for (int64_t i = begin; i < end; ++i) {
      const auto b = i / H, h = i % H;
      const float* qp = q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1);
      const float* kp = k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1);
      const float* vp = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
      float* op = with_context ? context.data_ptr<float>() + (b * H + h) * N * D : nullptr;
      float* imp = importance.data_ptr<float>() + (b * H + h) * N;
      const int n_ = N, d_ = D, ldq = q.stride(2), ldk = k.stride(2), ldv = v.stride(2);
      for (int64_t s = 0; s < N; s += block) {
        const int bq = std::min(block, N - s);
        if (mode & 2) sgemm_("T", "N", &n_, &bq, &d_, &alpha, kp, &ldk, qp + s * ldq, &ldq, &zero, scores.data(), &n_);
        if (mode & 1) softmax_rows_and_sum_columns(scores.data(), bq, N, imp);
        if (with_context) sgemm_("N", "N", &d_, &bq, &n_, &one_, vp, &ldv, scores.data(), &n_, &zero, op + s * D, &d_);
      }
    }
  });
  importance.div_(N);
  return {context, importance};
}
'''
flags = ["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
name = "fpt_attention_kernel"
os.makedirs("/tmp/fpt_attention_kernel", exist_ok=True)
mod = load_inline(name, cpp_sources=src, functions=["attend_and_rank"], extra_cflags=flags, build_directory="/tmp/fpt_attention_kernel", verbose=False)
torch.manual_seed(0)
H, N, D = 12, 1025, 64
qkv = torch.randn(1, N, 3, H, D).permute(2, 0, 3, 1, 4)
q, k, v = qkv.unbind(0)
scale = D ** -0.5
def fused(): return F.scaled_dot_product_attention(q, k, v)
def current():  # the extraction's own per-head loop
    return FrozenViTBackbone._attend_and_rank(q, k, v, scale)
ref = current()
arms = {"fused": fused, "current": current}
for blk in (64, 256, 1025):
    arms[f"ext{blk}"] = (lambda blk: lambda: mod.attend_and_rank(q, k, v, scale, blk, True, 3))(blk)
    c, i = arms[f"ext{blk}"]()
    print(blk, (c - ref[0]).abs().max().item(), ((i - ref[1]).abs() / ref[1]).max().item())
for name, m in (("softmax_av", 1), ("gemms", 2), ("av", 0)):
    arms[name] = (lambda m: lambda: mod.attend_and_rank(q, k, v, scale, N, True, m))(m)
res = {a: [] for a in arms}
with torch.inference_mode():
    for r in range(15):
        for a, f in arms.items():
            t = time.perf_counter(); f(); res[a].append(time.perf_counter() - t)
for a, v_ in res.items(): print(a, "median %.1f ms min %.1f" % (1000*statistics.median(v_), 1000*min(v_)))
