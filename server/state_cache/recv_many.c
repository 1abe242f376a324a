/* Receives a snapshot read's replies on several sockets at once, one native thread per socket,
 * without Python's GIL (loaded with ctypes by server/state_cache/native.py).
 *
 * Why: with one Python thread per socket, every thread must take the GIL to start and again after
 * each receive, and on the H200 host each hand-off to a sleeping thread costs a wake-up of
 * ~0.15-0.2 ms: 16 reader threads started 3.7-4.2 ms apart, a third of the 48 MiB read. Here the
 * caller's thread releases the GIL once (ctypes does), starts the threads, and each receives its
 * socket's bytes into the given segments, checks the header and CRLF bytes against what they
 * must be, and computes each payload piece's CRC-32 (zlib's polynomial, so the Python side
 * combines them with the rest) while the next bytes arrive: ISA-L's where the caller passes it,
 * else the table-driven one below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

enum { GLA_OK = 0, GLA_MISMATCH = 1, GLA_CLOSED = 2, GLA_TIMEOUT = 3, GLA_ERROR = 4 };

typedef struct {
    unsigned char *base;         /* where the bytes land */
    int64_t len;
    int64_t piece;               /* >= 0: payload of this piece (its CRC); -1: header or CRLF */
    const unsigned char *expect; /* for piece -1: the bytes these must be */
} gla_seg;

typedef struct {
    int64_t fd;
    int64_t nsegs;
    gla_seg *segs;
    uint32_t *crcs;      /* indexed by gla_seg.piece; the caller zeroes them */
    int64_t deadline_ns; /* CLOCK_MONOTONIC; the socket's SO_RCVTIMEO bounds each wait */
    int64_t received;    /* out: bytes received */
    int64_t status;      /* out: GLA_* */
    int64_t err;         /* out: errno for GLA_ERROR */
    /* the CRC-32 to use, as zlib's crc32(crc, p, n) (ISA-L's crc32_gzip_refl, ~3x this file's);
     * NULL: gla_crc32 below */
    uint32_t (*crc_fn)(uint32_t, const unsigned char *, uint64_t);
} gla_job;

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

/* zlib's crc32(crc, p, n): the reflected CRC-32, eight bytes per step */
uint32_t gla_crc32(uint32_t crc, const unsigned char *p, int64_t n) {
    pthread_once(&crc_once, crc_init);
    crc = ~crc;
    while (n > 0 && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
        n--;
    }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc_table[7][v & 0xff] ^ crc_table[6][(v >> 8) & 0xff] ^ crc_table[5][(v >> 16) & 0xff] ^
              crc_table[4][(v >> 24) & 0xff] ^ crc_table[3][(v >> 32) & 0xff] ^ crc_table[2][(v >> 40) & 0xff] ^
              crc_table[1][(v >> 48) & 0xff] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
#endif
    while (n-- > 0) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define MAX_IOV 64

static void *run_job(void *arg) {
    gla_job *job = (gla_job *)arg;
    int64_t i = 0, off = 0; /* the segment being filled and how much of it is */
    job->received = 0;
    job->status = GLA_OK;
    job->err = 0;
    while (i < job->nsegs) {
        struct iovec iov[MAX_IOV];
        int n = 0;
        for (int64_t j = i; j < job->nsegs && n < MAX_IOV; j++, n++) {
            int64_t skip = j == i ? off : 0;
            iov[n].iov_base = job->segs[j].base + skip;
            iov[n].iov_len = (size_t)(job->segs[j].len - skip);
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)n;
        ssize_t got = recvmsg((int)job->fd, &msg, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) { /* one receive slice passed */
                if (now_ns() > job->deadline_ns) {
                    job->status = GLA_TIMEOUT;
                    return NULL;
                }
                continue;
            }
            job->status = GLA_ERROR;
            job->err = errno;
            return NULL;
        }
        if (got == 0) {
            job->status = GLA_CLOSED;
            return NULL;
        }
        job->received += got;
        while (got > 0) {
            gla_seg *s = &job->segs[i];
            int64_t take = s->len - off < got ? s->len - off : got;
            if (s->piece >= 0) {
                uint32_t c = job->crcs[s->piece];
                job->crcs[s->piece] = job->crc_fn ? job->crc_fn(c, s->base + off, (uint64_t)take)
                                                  : gla_crc32(c, s->base + off, take);
            } else if (memcmp(s->base + off, s->expect + off, (size_t)take) != 0) {
                job->status = GLA_MISMATCH; /* the stream is out of step from here on */
                return NULL;
            }
            off += take;
            got -= take;
            if (off == s->len) {
                i++;
                off = 0;
            }
        }
        if (i < job->nsegs && now_ns() > job->deadline_ns) {
            job->status = GLA_TIMEOUT;
            return NULL;
        }
    }
    return NULL;
}

/* Runs every job at once (the last on the calling thread); returns 0, or -1 if a thread could not
 * be started (those jobs then run on the calling thread, one after another). */
int gla_recv_many(gla_job *jobs, int64_t njobs) {
    pthread_once(&crc_once, crc_init);
    if (njobs <= 0) return 0;
    pthread_t threads[njobs];
    int started[njobs];
    int rc = 0;
    for (int64_t k = 0; k < njobs - 1; k++) {
        started[k] = pthread_create(&threads[k], NULL, run_job, &jobs[k]) == 0;
        if (!started[k]) rc = -1;
    }
    run_job(&jobs[njobs - 1]);
    for (int64_t k = 0; k < njobs - 1; k++) {
        if (started[k])
            pthread_join(threads[k], NULL);
        else
            run_job(&jobs[k]);
    }
    return rc;
}
