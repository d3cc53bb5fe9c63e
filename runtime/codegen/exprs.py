"""The one op -> expression table both printers read: for every primitive of
the kernel description (runtime/kernel/ir.py) its C++ format and its Triton
format, and the casts between value types."""
from __future__ import annotations

# primitive -> (C++ format, Triton format)
EXPR = {
    "add": ("({0} + {1})", "({0} + {1})"),
    "sub": ("({0} - {1})", "({0} - {1})"),
    "mul": ("({0} * {1})", "({0} * {1})"),
    "div": ("((float){0} / (float){1})", "({0}.to(tl.float32) / {1})"),
    "maximum": ("pl_max({0}, {1})", "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    "minimum": ("pl_min({0}, {1})", "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    "neg": ("(-{0})", "(-{0})"),
    "exp": ("pl_exp({0})", "tl.exp({0})"),
    "log": ("pl_log({0})", "tl.log({0})"),
    "sqrt": ("sqrtf({0})", "tl.sqrt({0})"),
    "rsqrt": ("(1.0f / sqrtf({0}))", "tl.rsqrt({0})"),
    "recip": ("(1.0f / {0})", "(1.0 / {0})"),
    "abs": ("pl_abs({0})", "tl.abs({0})"),
    "tanh": ("pl_tanh({0})", "tl.where(tl.abs({0}) < 0.625, ((((-5.70498872745e-3 * {0} * {0} + 2.06390887954e-2) "
                             "* {0} * {0} - 5.37397155531e-2) * {0} * {0} + 1.33314422036e-1) * {0} * {0} "
                             "- 3.33332819422e-1) * {0} * {0} * {0} + {0}, 2.0 * tl.sigmoid(2.0 * {0}) - 1.0)"),
    "sigmoid": ("pl_sigmoid({0})", "tl.sigmoid({0})"),
    "erf": ("pl_erf({0})", "tl.erf({0})"),
    "sin": ("sinf({0})", "tl.sin({0})"),
    "cos": ("cosf({0})", "tl.cos({0})"),
    "floor": ("floorf({0})", "tl.floor({0})"),
    "ceil": ("ceilf({0})", "tl.ceil({0})"),
    "trunc": ("truncf({0})", "tl.where({0} < 0, tl.ceil({0}), tl.floor({0}))"),
    # division with rounding as ATen's: integers exactly (C++: a zero divisor flags the call), floats floored
    # by ATen's fmod algorithm (c10 div_floor_floating)
    "idiv_trunc": ("pl_idiv({0}, {1}, false, &pl_bad)", "({0} // tl.where({1} == 0, 1, {1}))"),
    "idiv_floor": ("pl_idiv({0}, {1}, true, &pl_bad)",
                   "(({0} // tl.where({1} == 0, 1, {1})) - ((({0} % tl.where({1} == 0, 1, {1})) != 0) & "
                   "(({0} < 0) != ({1} < 0))).to(tl.int64))"),
    "fdiv_floor": ("pl_fdiv_floor({0}, {1})", "tl.floor({0} / {1})"),   # Triton: floor(a / b) (1 // 0.1: 10)
    "eq": ("({0} == {1})", "({0} == {1})"),
    "ne": ("({0} != {1})", "({0} != {1})"),
    "lt": ("({0} < {1})", "({0} < {1})"),
    "le": ("({0} <= {1})", "({0} <= {1})"),
    "gt": ("({0} > {1})", "({0} > {1})"),
    "ge": ("({0} >= {1})", "({0} >= {1})"),
    "not": ("(!{0})", "({0} == 0)"),
    "and": ("({0} & {1})", "({0} & {1})"),      # bitwise on bools: gcc vectorizes these, not && / ||
    "or": ("({0} | {1})", "({0} | {1})"),
    "where": ("({0} ? {1} : {2})", "tl.where({0}, {1}, {2})"),
    # integer results in eager's storage width (runtime/kernel/primitives.py `narrow`)
    "f2i32": ("pl_f2i32({0})", "({0}).to(tl.int32).to(tl.int64)"),
    "wrap_i32": ("(int64_t)(int32_t)({0})", "({0}).to(tl.int32).to(tl.int64)"),
    "wrap_i16": ("(int64_t)(int16_t)({0})", "({0}).to(tl.int16).to(tl.int64)"),
    "wrap_i8": ("(int64_t)(int8_t)({0})", "({0}).to(tl.int8).to(tl.int64)"),
    "wrap_u8": ("(int64_t)(uint8_t)({0})", "({0}).to(tl.uint8).to(tl.int64)"),
    # a float result rounded to eager's storage dtype, op by op (primitives.py `round_each_op`)
    "round_bf16": ("pl_bf16(pl_to_bf16({0}))", "({0}).to(tl.bfloat16).to(tl.float32)"),
    "round_f16": ("(float)(_Float16)({0})", "({0}).to(tl.float16).to(tl.float32)"),
}
CAST = {  # value type -> (C++ cast, Triton cast)
    "f": ("(float)({0})", "({0}).to(tl.float32)"),
    "i": ("(int64_t)({0})", "({0}).to(tl.int64)"),
    "b": ("(({0}) != 0)", "(({0}) != 0)"),
}

