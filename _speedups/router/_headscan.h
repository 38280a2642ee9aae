/* Finding and checking an HTTP/1.1 message head, 16 bytes a step.
 *
 * Used by _chttp.pyx in place of one memchr per line and one per kind of
 * forbidden byte: a 6-line response head took about 20 memchr calls, and on
 * heads this short each call costs more in set-up than in scanning.  The
 * results are those of the plain C loops below, which are also what runs
 * where SSE2 is missing (it is part of every x86-64 CPU).
 */
#ifndef EDGE_ROUTER_HEADSCAN_H
#define EDGE_ROUTER_HEADSCAN_H

#include <stddef.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define EH_SSE2 1
#else
#define EH_SSE2 0
#endif

typedef struct {
    ptrdiff_t blank;  /* offset of the LF that starts the blank line */
    ptrdiff_t end;    /* offset just past the head */
    ptrdiff_t lines;  /* lines before the blank one */
    int folded;       /* a line after the first starts with SP or HTAB */
} eh_span;

/* One LF at pos: does the head end there?  1 yes, 0 no, -1 undecided
 * (the bytes that would decide are past stop). */
static inline int
eh_at_lf(const char *buf, ptrdiff_t pos, ptrdiff_t stop, eh_span *span)
{
    char next;

    if (pos + 1 >= stop)
        return -1;
    next = buf[pos + 1];
    if (next == '\n') {
        span->blank = pos;
        span->end = pos + 2;
        return 1;
    }
    if (next == '\r') {
        if (pos + 2 >= stop)
            return -1;
        if (buf[pos + 2] == '\n') {
            span->blank = pos;
            span->end = pos + 3;
            return 1;
        }
    }
    else if (next == ' ' || next == '\t') {
        span->folded = 1;
    }
    span->lines += 1;
    return 0;
}

/* The head ends at the first LF followed by an empty line (LF, or CR LF).
 * Only buf[0:stop] is read.  Returns 1 with *span filled, or 0. */
static int
eh_find_head(const char *buf, ptrdiff_t stop, eh_span *span)
{
    ptrdiff_t pos = 0;
    int found;

    span->lines = 1;
    span->folded = 0;
#if EH_SSE2
    {
        const __m128i lf = _mm_set1_epi8('\n');
        for (; pos + 16 <= stop; pos += 16) {
            __m128i block = _mm_loadu_si128((const __m128i *)(buf + pos));
            unsigned int mask =
                (unsigned int)_mm_movemask_epi8(_mm_cmpeq_epi8(block, lf));
            while (mask) {
                found = eh_at_lf(buf, pos + __builtin_ctz(mask), stop, span);
                if (found)
                    return found > 0;
                mask &= mask - 1;
            }
        }
    }
#endif
    for (; pos < stop; pos++) {
        if (buf[pos] == '\n') {
            found = eh_at_lf(buf, pos, stop, span);
            if (found)
                return found > 0;
        }
    }
    return 0;
}

/* RFC 9112 §2.2 and RFC 9110 §5.5, as h11 reads them: in buf[0:end], NUL,
 * VT and FF are valid nowhere, and CR only right before LF.  Returns 0,
 * 1 for a control byte (reported first, wherever it is), 2 for a bare CR. */
static int
eh_check_head(const char *buf, ptrdiff_t end)
{
    ptrdiff_t pos = 0;
    int bare_cr = 0;
    unsigned char c;

#if EH_SSE2
    {
        const __m128i nul = _mm_setzero_si128();
        const __m128i vt = _mm_set1_epi8(0x0B);
        const __m128i ff = _mm_set1_epi8(0x0C);
        const __m128i cr = _mm_set1_epi8('\r');
        __m128i control = _mm_setzero_si128();
        for (; pos + 16 <= end; pos += 16) {
            __m128i block = _mm_loadu_si128((const __m128i *)(buf + pos));
            unsigned int crs;
            control = _mm_or_si128(control, _mm_cmpeq_epi8(block, nul));
            control = _mm_or_si128(control, _mm_cmpeq_epi8(block, vt));
            control = _mm_or_si128(control, _mm_cmpeq_epi8(block, ff));
            crs = (unsigned int)_mm_movemask_epi8(_mm_cmpeq_epi8(block, cr));
            while (crs) {
                ptrdiff_t at = pos + __builtin_ctz(crs);
                if (at + 1 >= end || buf[at + 1] != '\n')
                    bare_cr = 1;
                crs &= crs - 1;
            }
        }
        if (_mm_movemask_epi8(control))
            return 1;
    }
#endif
    for (; pos < end; pos++) {
        c = (unsigned char)buf[pos];
        if (c == 0x00 || c == 0x0B || c == 0x0C)
            return 1;
        if (c == '\r' && (pos + 1 >= end || buf[pos + 1] != '\n'))
            bare_cr = 1;
    }
    return bare_cr ? 2 : 0;
}

#endif
