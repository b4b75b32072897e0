"""FLOPs charged for the elementwise operators of a LLaMA layer, one table for prefill and decode.

Each count is per element (or per row, per rotate-half pair, per score) of the operator's
output on one core; the matrix products are charged by their kernels (2 FLOPs a multiply-add).
"""
RMS_SUMSQ = 2        # per element: square and add
RMS_ROW = 4          # per row: mean, add eps, square root, reciprocal (one scalar operation)
RMS_SCALE = 2        # per element: times 1/rms, times the weight
ROPE_PAIR = 6        # per (d, d + head_dim/2) pair: 4 multiplies, 2 adds
SCORE_SCALE_MASK = 2  # per score: scale by 1/sqrt(head_dim), select the causal or cached ones
SOFTMAX_MAX = 1      # per score: compare
SOFTMAX_EXP_SUM = 3  # per score: subtract the max, exponentiate, add
SOFTMAX_DIVIDE = 1   # per score: divide by the sum
SILU_MUL = 5         # per element: negate, exponentiate, add, divide, multiply by up
ADD = 1              # per element: the residual
SOFTMAX_ALL = SCORE_SCALE_MASK + SOFTMAX_MAX + SOFTMAX_EXP_SUM + SOFTMAX_DIVIDE
