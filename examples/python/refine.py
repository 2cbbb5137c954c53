"""Refines a small synthetic CT through libtis with ctypes (standard library only, no build step).

    python3 examples/python/refine.py target/release/libtis.so
"""

import array
import ctypes
import sys

TIS_OK, TIS_DEVICE_CPU, TIS_DTYPE_F32 = 0, 0, 4


class TisBox(ctypes.Structure):
    _fields_ = [("start", ctypes.c_int64 * 3), ("size", ctypes.c_int64 * 3)]


def main(library):
    tis = ctypes.CDLL(library)
    tis.tis_version.restype = ctypes.c_char_p
    tis.tis_last_error.restype = ctypes.c_char_p

    def check(status):
        if status != TIS_OK:
            raise RuntimeError(f"libtis error {status}: {tis.tis_last_error().decode()}")

    print("libtis", tis.tis_version().decode())
    model = ctypes.c_void_p()
    check(tis.tis_model_load_default(TIS_DEVICE_CPU, ctypes.byref(model)))

    z, y, x = 24, 48, 48
    ct = array.array("f", [-1000.0] * (z * y * x))
    for k in range(z):
        for j in range(y):
            for i in range(x):
                if ((j - y / 2) / (0.45 * y)) ** 2 + ((i - x / 2) / (0.45 * x)) ** 2 < 1:
                    ct[(k * y + j) * x + i] = 40.0 + (i * 7 + j * 13 + k * 29) % 11
    dims = (ctypes.c_int64 * 3)(z, y, x)
    spacing = (ctypes.c_double * 3)(3.0, 3.0, 3.0)
    buffer = (ctypes.c_float * len(ct)).from_buffer(ct)

    session = ctypes.c_void_p()
    check(tis.tis_session_create(model, buffer, TIS_DTYPE_F32, dims, spacing, ctypes.byref(session)))
    check(tis.tis_session_click(session, ctypes.c_int64(z // 2), ctypes.c_int64(y // 2), ctypes.c_int64(x // 2), 1))
    box, latency = TisBox(), ctypes.c_double()
    check(tis.tis_session_changed_box(session, ctypes.byref(box)))
    check(tis.tis_session_last_latency_ms(session, ctypes.byref(latency)))
    labels = (ctypes.c_uint16 * len(ct))()
    check(tis.tis_session_labels(session, labels, ctypes.c_size_t(len(labels))))
    counts = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    print(f"refined in {latency.value:.1f} ms; changed box start {list(box.start)} size {list(box.size)}; "
          f"voxels per class {dict(sorted(counts.items()))}")
    status = tis.tis_session_click(session, ctypes.c_int64(z), ctypes.c_int64(0), ctypes.c_int64(0), 1)
    assert status != TIS_OK, "a click outside the image must be refused"
    print("outside click refused:", tis.tis_last_error().decode())
    check(tis.tis_session_free(session))
    check(tis.tis_model_free(model))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/release/libtis.so")
