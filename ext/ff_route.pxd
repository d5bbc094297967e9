# The route of a frame: which ring its symbol goes to. One definition for the network
# process (listener.pyx) and the replay (capture.pyx), so that a replay puts every symbol on
# the ring the live run used.
from libc.stdint cimport int32_t, uint32_t
from libc.string cimport memchr


cdef inline bint _is_ws(char c) noexcept nogil:
    return c == b' ' or c == b'\n' or c == b'\r' or c == b'\t'


cdef inline int32_t ff_route(const char *p, Py_ssize_t n) noexcept nogil:
    """FNV-1a hash (31 bits) of the first string value of a "c" key, or -1 if there is none.

    Inside a bar, "c" is the close price, a number: it is skipped, so key order does not
    matter. The raw bytes are hashed: a code written with JSON escapes would route apart from
    its plain spelling (the provider does not escape codes).
    """
    cdef Py_ssize_t i = 0, k
    cdef const char *q
    cdef uint32_t h
    while i < n:
        q = <const char *>memchr(p + i, b'"', n - i)
        if q == NULL:
            return -1
        i = q - p
        if i + 2 < n and p[i + 1] == b'c' and p[i + 2] == b'"':
            k = i + 3
            while k < n and _is_ws(p[k]):
                k += 1
            if k < n and p[k] == b':':
                k += 1
                while k < n and _is_ws(p[k]):
                    k += 1
                if k < n and p[k] == b'"':
                    k += 1
                    h = 2166136261u
                    while k < n and p[k] != b'"':
                        h = (h ^ <unsigned char>p[k]) * 16777619u
                        k += 1
                    if k >= n:
                        return -1
                    return <int32_t>(h & 0x7fffffffu)
            i += 3
        else:
            i += 1
    return -1
