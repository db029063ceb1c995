/* standin: the smallest process a gateway takes for a Jupyter kernel.

   One process per kernel, as a real kernel is, launched through a kernelspec's argv:

       standin CONNECTION_FILE

   It binds the five ports of the connection file (tcp only) and speaks ZMTP 3.0 on them
   itself (NULL mechanism, no libzmq): what connects to it is the gateway's real libzmq
   sockets, which cannot tell it from a kernel. Single-threaded, one epoll loop, no heap
   beyond its connections' buffers: about 100 KB of private memory per kernel.

   Channels (Jupyter messaging protocol 5.3, HMAC-SHA256 with the connection file's key,
   incoming signatures checked, bad ones dropped as ipykernel drops them):
     shell    ROUTER  kernel_info, execute, comm_info, is_complete, history, complete,
                      inspect; each request framed by status busy/idle on iopub
     control  ROUTER  shutdown (reply, then exit 0), interrupt, kernel_info
     stdin    ROUTER  accepted, never used
     iopub    PUB     status, execute_input, error; sent to peers that subscribed
     hb       ROUTER  echoes every message as it came (a REQ peer gets its ping back)

   An execute runs nothing: `pass` and any other code answer at once with status ok and a
   growing execution_count. Code containing `time.sleep(S)` makes the kernel busy for S
   seconds without blocking its loop (shell requests queue meanwhile, as in a real kernel),
   so that an interrupt has something to act on.

   Signals act on the kernel as on ipykernel: SIGINT interrupts a running execute
   (KeyboardInterrupt error reply; nothing happens when idle), SIGTERM exits at once,
   SIGKILL kills it. A shutdown_request is answered, then the process exits.

   Build: cc -O2 -o standin standin.c   (bench/scale.py builds it into its temporary dir) */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* -- SHA-256 and HMAC (FIPS 180-4, RFC 2104) ------------------------------------------ */

typedef struct {
    uint32_t h[8];
    uint64_t len;
    unsigned char buf[64];
    size_t n;
} sha256_t;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256_t *s, const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) +
                      K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d;
    s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha256_init(sha256_t *s) {
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, h0, sizeof h0);
    s->len = 0;
    s->n = 0;
}

static void sha256_update(sha256_t *s, const void *data, size_t len) {
    const unsigned char *p = data;
    s->len += len;
    while (len) {
        size_t take = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, take);
        s->n += take, p += take, len -= take;
        if (s->n == 64) {
            sha256_block(s, s->buf);
            s->n = 0;
        }
    }
}

static void sha256_final(sha256_t *s, unsigned char out[32]) {
    uint64_t bits = s->len * 8;
    unsigned char pad = 0x80, zero = 0, lenb[8];
    sha256_update(s, &pad, 1);
    while (s->n != 56) sha256_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(s, lenb, 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(s->h[i] >> 24), out[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s->h[i] >> 8), out[4 * i + 3] = (unsigned char)s->h[i];
    }
}

static unsigned char hmac_ipad[64], hmac_opad[64];
static int signing; /* an empty key means unsigned messages */

static void hmac_setkey(const char *key, size_t len) {
    unsigned char k[64] = {0};
    if (len > 64) {
        sha256_t s;
        sha256_init(&s);
        sha256_update(&s, key, len);
        sha256_final(&s, k);
    } else {
        memcpy(k, key, len);
    }
    for (int i = 0; i < 64; i++) hmac_ipad[i] = k[i] ^ 0x36, hmac_opad[i] = k[i] ^ 0x5c;
    signing = len > 0;
}

/* hex HMAC of the concatenation of n parts, as jupyter_client's Session.sign */
static void hmac_hex(const unsigned char *const *parts, const size_t *lens, int n, char hex[65]) {
    sha256_t s;
    unsigned char inner[32], mac[32];
    sha256_init(&s);
    sha256_update(&s, hmac_ipad, 64);
    for (int i = 0; i < n; i++) sha256_update(&s, parts[i], lens[i]);
    sha256_final(&s, inner);
    sha256_init(&s);
    sha256_update(&s, hmac_opad, 64);
    sha256_update(&s, inner, 32);
    sha256_final(&s, mac);
    for (int i = 0; i < 32; i++) sprintf(hex + 2 * i, "%02x", mac[i]);
}

/* -- a little JSON: the top-level keys of an object, values as raw tokens ------------ */

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

static const char *skip_string(const char *p, const char *end) { /* p at the opening quote */
    for (p++; p < end; p++) {
        if (*p == '\\')
            p++;
        else if (*p == '"')
            return p + 1;
    }
    return end;
}

static const char *skip_value(const char *p, const char *end) {
    p = skip_ws(p, end);
    if (p >= end) return end;
    if (*p == '"') return skip_string(p, end);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < end) {
            if (*p == '"') {
                p = skip_string(p, end);
                continue;
            }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') {
                if (--depth == 0) return p + 1;
            }
            p++;
        }
        return end;
    }
    while (p < end && *p != ',' && *p != '}' && *p != ']') p++;
    return p;
}

/* The raw value token of `key` in the top-level object `json`, or NULL. */
static const char *json_get(const char *json, size_t n, const char *key, size_t *vlen) {
    const char *p = skip_ws(json, json + n), *end = json + n;
    size_t klen = strlen(key);
    if (p >= end || *p != '{') return NULL;
    p++;
    while (p < end) {
        p = skip_ws(p, end);
        if (p >= end || *p == '}' || *p != '"') return NULL;
        const char *k = p + 1, *kend = skip_string(p, end) - 1;
        p = skip_ws(kend + 1, end);
        if (p >= end || *p != ':') return NULL;
        const char *v = skip_ws(p + 1, end), *vend = skip_value(v, end);
        if ((size_t)(kend - k) == klen && memcmp(k, key, klen) == 0) {
            *vlen = (size_t)(vend - v);
            return v;
        }
        p = skip_ws(vend, end);
        if (p < end && *p == ',') p++;
    }
    return NULL;
}

/* A string value without its quotes (escapes kept as they are) into out; 0 if absent. */
static int json_str(const char *json, size_t n, const char *key, char *out, size_t cap) {
    size_t len;
    const char *v = json_get(json, n, key, &len);
    if (!v || len < 2 || *v != '"' || len - 2 >= cap) return 0;
    memcpy(out, v + 1, len - 2);
    out[len - 2] = 0;
    return 1;
}

static long json_int(const char *json, size_t n, const char *key, long dflt) {
    size_t len;
    const char *v = json_get(json, n, key, &len);
    return v && len ? strtol(v, NULL, 10) : dflt;
}

/* -- buffers, frames, connections ------------------------------------------------------ */

typedef struct {
    unsigned char *p;
    size_t len, cap, off;
} buf_t;

typedef struct {
    unsigned char *p;
    size_t n;
} frame_t;

typedef struct {
    frame_t *f;
    int n, cap;
} msg_t;

enum { CH_SHELL, CH_CONTROL, CH_STDIN, CH_IOPUB, CH_HB, NCH };
static const char *CH_PORT[NCH] = {"shell_port", "control_port", "stdin_port", "iopub_port",
                                   "hb_port"};
static const char *CH_TYPE[NCH] = {"ROUTER", "ROUTER", "ROUTER", "PUB", "ROUTER"};

enum { K_LISTEN, K_SIGNAL, K_CONN };

typedef struct conn {
    struct conn *next;
    int kind, fd, ch;
    uint64_t id;
    unsigned greeting; /* bytes of the peer's 64-byte greeting read so far */
    int ready, subscribed, dead, polling_out;
    buf_t in, out;
    msg_t cur; /* frames of the message being received */
} conn_t;

static conn_t *conns, *dead_conns;
static uint64_t next_conn_id = 1;
static int ep;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "standin: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) die("out of memory");
    return p;
}

static void buf_put(buf_t *b, const void *p, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void buf_free(buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

static void msg_add(msg_t *m, const void *p, size_t n) {
    if (m->n == m->cap) {
        m->cap = m->cap ? 2 * m->cap : 8;
        m->f = xrealloc(m->f, (size_t)m->cap * sizeof *m->f);
    }
    m->f[m->n].p = xrealloc(NULL, n ? n : 1);
    memcpy(m->f[m->n].p, p, n);
    m->f[m->n].n = n;
    m->n++;
}

static void msg_free(msg_t *m) {
    for (int i = 0; i < m->n; i++) free(m->f[i].p);
    free(m->f);
    memset(m, 0, sizeof *m);
}

/* ZMTP 3.0 frame: flags (MORE 1, LONG 2, COMMAND 4), size (1 or 8 bytes), body */
static void put_frame(buf_t *b, const void *p, size_t n, int more, int command) {
    unsigned char hdr[9];
    size_t h = 1;
    hdr[0] = (unsigned char)((more ? 1 : 0) | (command ? 4 : 0));
    if (n > 255) {
        hdr[0] |= 2;
        for (int i = 0; i < 8; i++) hdr[1 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
        h = 9;
    } else {
        hdr[1] = (unsigned char)n;
        h = 2;
    }
    buf_put(b, hdr, h);
    buf_put(b, p, n);
}

static void conn_close(conn_t *c) {
    if (c->dead) return;
    c->dead = 1;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    for (conn_t **pp = &conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    c->next = dead_conns; /* freed after the current batch of events */
    dead_conns = c;
}

static void conn_flush(conn_t *c) {
    while (!c->dead && c->out.off < c->out.len) {
        ssize_t w = send(c->fd, c->out.p + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) break;
            conn_close(c);
            return;
        }
        c->out.off += (size_t)w;
    }
    if (c->dead) return;
    int want = c->out.off < c->out.len;
    if (!want) {
        c->out.len = c->out.off = 0;
        if (c->out.cap > 65536) buf_free(&c->out); /* do not keep a big burst's memory */
    }
    if (want != c->polling_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->polling_out = want;
    }
}

static conn_t *conn_by_id(uint64_t id) {
    for (conn_t *c = conns; c; c = c->next)
        if (c->id == id) return c;
    return NULL;
}

/* -- the kernel ---------------------------------------------------------------------- */

static char session_id[33];
static unsigned long msg_counter;
static int execution_count;
static long interrupts;

static const char KERNEL_INFO[] =
    "{\"status\":\"ok\",\"protocol_version\":\"5.3\",\"implementation\":\"standin\","
    "\"implementation_version\":\"1.0\",\"language_info\":{\"name\":\"python\","
    "\"version\":\"3.11\",\"mimetype\":\"text/x-python\",\"file_extension\":\".py\","
    "\"pygments_lexer\":\"ipython3\",\"codemirror_mode\":{\"name\":\"ipython\",\"version\":3},"
    "\"nbconvert_exporter\":\"python\"},\"banner\":\"stand-in kernel (bench/standin)\","
    "\"help_links\":[]}";

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One Jupyter message's frames into b: idents, <IDS|MSG>, signature, header, parent,
   metadata, content. `parent` is the request's header as it came ("{}" for none). */
static void encode_msg(buf_t *b, const frame_t *idents, int nid, const char *msg_type,
                       const frame_t *parent, const char *content) {
    char header[320], date[40], sig[65] = "";
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t dl = strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(date + dl, sizeof date - dl, ".%06ldZ", ts.tv_nsec / 1000);
    int hl = snprintf(header, sizeof header,
                      "{\"msg_id\":\"%s_%d_%lu\",\"msg_type\":\"%s\",\"username\":\"standin\","
                      "\"session\":\"%s\",\"date\":\"%s\",\"version\":\"5.3\"}",
                      session_id, (int)getpid(), ++msg_counter, msg_type, session_id, date);
    static const unsigned char empty[] = "{}";
    const unsigned char *pp = parent ? parent->p : empty;
    size_t pl = parent ? parent->n : 2;
    const unsigned char *parts[4] = {(const unsigned char *)header, pp, empty,
                                     (const unsigned char *)content};
    size_t lens[4] = {(size_t)hl, pl, 2, strlen(content)};
    if (signing) hmac_hex(parts, lens, 4, sig);
    for (int i = 0; i < nid; i++) put_frame(b, idents[i].p, idents[i].n, 1, 0);
    put_frame(b, "<IDS|MSG>", 9, 1, 0);
    put_frame(b, sig, strlen(sig), 1, 0);
    for (int i = 0; i < 4; i++) put_frame(b, parts[i], lens[i], i < 3, 0);
}

static void reply(uint64_t conn_id, const frame_t *idents, int nid, const char *msg_type,
                  const frame_t *parent, const char *content) {
    conn_t *c = conn_by_id(conn_id);
    if (c) encode_msg(&c->out, idents, nid, msg_type, parent, content);
}

static void publish(const char *msg_type, const frame_t *parent, const char *content) {
    char topic[80];
    snprintf(topic, sizeof topic, "kernel.%s.%s", session_id, msg_type);
    frame_t t = {(unsigned char *)topic, strlen(topic)};
    buf_t b = {0};
    encode_msg(&b, &t, 1, msg_type, parent, content);
    for (conn_t *c = conns; c; c = c->next)
        if (c->kind == K_CONN && c->ch == CH_IOPUB && c->subscribed) buf_put(&c->out, b.p, b.len);
    buf_free(&b);
}

static void status(const frame_t *parent, const char *state) {
    char content[64];
    snprintf(content, sizeof content, "{\"execution_state\":\"%s\"}", state);
    publish("status", parent, content);
}

/* A request taken apart: where its idents end, its header, its content. */
typedef struct {
    uint64_t conn_id;
    int ch;
    msg_t m;
    int nid;             /* frames before <IDS|MSG> */
    frame_t *header;     /* m.f[nid + 2] */
    frame_t *content;    /* m.f[nid + 5] */
    char msg_type[64];
} request_t;

typedef struct pending {
    struct pending *next;
    request_t r;
} pending_t;

static pending_t *queue_head, **queue_tail = &queue_head;
static struct {
    int active;
    request_t r;
    int count;
    double until;
} running;

static void request_free(request_t *r) { msg_free(&r->m); }

static void finish_execute(request_t *r, int count, int interrupted) {
    char content[160];
    if (interrupted) {
        publish("error", r->header,
                "{\"ename\":\"KeyboardInterrupt\",\"evalue\":\"\",\"traceback\":[]}");
        snprintf(content, sizeof content,
                 "{\"status\":\"error\",\"execution_count\":%d,\"ename\":\"KeyboardInterrupt\","
                 "\"evalue\":\"\",\"traceback\":[]}",
                 count);
    } else {
        snprintf(content, sizeof content,
                 "{\"status\":\"ok\",\"execution_count\":%d,\"user_expressions\":{},"
                 "\"payload\":[]}",
                 count);
    }
    reply(r->conn_id, r->m.f, r->nid, "execute_reply", r->header, content);
    status(r->header, "idle");
}

/* Returns 1 when the request was kept (an execute that now runs for a while). */
static int handle(request_t *r) {
    const char *t = r->msg_type;
    const frame_t *h = r->header;
    const char *content = (const char *)r->content->p;
    size_t clen = r->content->n;
    if (strcmp(t, "shutdown_request") == 0) {
        char body[80];
        int restart = 0;
        size_t vl;
        const char *v = json_get(content, clen, "restart", &vl);
        if (v && vl >= 4 && memcmp(v, "true", 4) == 0) restart = 1;
        snprintf(body, sizeof body, "{\"status\":\"ok\",\"restart\":%s}",
                 restart ? "true" : "false");
        status(h, "busy");
        reply(r->conn_id, r->m.f, r->nid, "shutdown_reply", h, body);
        publish("shutdown_reply", h, body);
        status(h, "idle");
        return -1; /* the caller flushes and exits */
    }
    if (strcmp(t, "interrupt_request") == 0) {
        status(h, "busy");
        reply(r->conn_id, r->m.f, r->nid, "interrupt_reply", h, "{\"status\":\"ok\"}");
        status(h, "idle");
        return 2; /* the caller interrupts */
    }
    status(h, "busy");
    if (strcmp(t, "kernel_info_request") == 0) {
        reply(r->conn_id, r->m.f, r->nid, "kernel_info_reply", h, KERNEL_INFO);
    } else if (strcmp(t, "execute_request") == 0) {
        size_t codelen = 0, vl;
        const char *code = json_get(content, clen, "code", &codelen);
        const char *silent = json_get(content, clen, "silent", &vl);
        int is_silent = silent && vl >= 4 && memcmp(silent, "true", 4) == 0;
        if (!code || *code != '"') code = "\"\"", codelen = 2;
        int count = is_silent ? execution_count : ++execution_count;
        if (!is_silent) {
            char *body = xrealloc(NULL, codelen + 64);
            snprintf(body, codelen + 64, "{\"code\":%.*s,\"execution_count\":%d}", (int)codelen,
                     code, count);
            publish("execute_input", h, body);
            free(body);
        }
        double seconds = 0;
        const char *s = memmem(code, codelen, "time.sleep(", 11);
        if (s) seconds = strtod(s + 11, NULL);
        if (seconds > 0) {
            running.r = *r;
            running.count = count;
            running.until = now_s() + seconds;
            running.active = 1;
            return 1;
        }
        finish_execute(r, count, 0);
        return 0;
    } else if (strcmp(t, "comm_info_request") == 0) {
        reply(r->conn_id, r->m.f, r->nid, "comm_info_reply", h, "{\"status\":\"ok\",\"comms\":{}}");
    } else if (strcmp(t, "is_complete_request") == 0) {
        reply(r->conn_id, r->m.f, r->nid, "is_complete_reply", h, "{\"status\":\"complete\"}");
    } else if (strcmp(t, "history_request") == 0) {
        reply(r->conn_id, r->m.f, r->nid, "history_reply", h, "{\"status\":\"ok\",\"history\":[]}");
    } else if (strcmp(t, "complete_request") == 0) {
        reply(r->conn_id, r->m.f, r->nid, "complete_reply", h,
              "{\"status\":\"ok\",\"matches\":[],\"cursor_start\":0,\"cursor_end\":0,"
              "\"metadata\":{}}");
    } else if (strcmp(t, "inspect_request") == 0) {
        reply(r->conn_id, r->m.f, r->nid, "inspect_reply", h,
              "{\"status\":\"ok\",\"found\":false,\"data\":{},\"metadata\":{}}");
    } else {
        fprintf(stderr, "standin: unknown message type %s ignored\n", t);
    }
    status(h, "idle");
    return 0;
}

static void flush_all(void) {
    for (conn_t *c = conns; c; c = c->next)
        if (c->kind == K_CONN && c->out.off < c->out.len) conn_flush(c);
}

static void exit_now(int code) {
    /* what is queued (a shutdown_reply) goes out before the process does */
    for (conn_t *c = conns; c; c = c->next) {
        if (c->kind != K_CONN || c->out.off >= c->out.len) continue;
        struct timeval tv = {1, 0};
        fcntl(c->fd, F_SETFL, 0);
        setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        while (c->out.off < c->out.len) {
            ssize_t w = send(c->fd, c->out.p + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
            if (w <= 0) break;
            c->out.off += (size_t)w;
        }
    }
    exit(code);
}

static void interrupt(void) {
    interrupts++;
    if (running.active) {
        running.active = 0;
        finish_execute(&running.r, running.count, 1);
        request_free(&running.r);
    }
}

static void run_queue(void) {
    while (!running.active && queue_head) {
        pending_t *p = queue_head;
        queue_head = p->next;
        if (!queue_head) queue_tail = &queue_head;
        int kept = handle(&p->r);
        if (kept < 0) exit_now(0);
        if (kept == 2) interrupt();
        if (kept != 1) request_free(&p->r);
        free(p);
    }
}

static void on_message(conn_t *c, msg_t *m) {
    if (c->ch == CH_HB) { /* echo as it came */
        for (int i = 0; i < m->n; i++) put_frame(&c->out, m->f[i].p, m->f[i].n, i < m->n - 1, 0);
        msg_free(m);
        return;
    }
    if (c->ch == CH_IOPUB) { /* ZMTP 3.0 subscription: \x01 topic (subscribe), \x00 (cancel) */
        if (m->n == 1 && m->f[0].n >= 1 && m->f[0].p[0] == 1) c->subscribed = 1;
        msg_free(m);
        return;
    }
    request_t r = {.conn_id = c->id, .ch = c->ch, .m = *m};
    memset(m, 0, sizeof *m);
    int d = 0;
    while (d < r.m.n && !(r.m.f[d].n == 9 && memcmp(r.m.f[d].p, "<IDS|MSG>", 9) == 0)) d++;
    if (d + 5 >= r.m.n) {
        fprintf(stderr, "standin: malformed message on channel %d dropped\n", c->ch);
        request_free(&r);
        return;
    }
    r.nid = d;
    r.header = &r.m.f[d + 2];
    r.content = &r.m.f[d + 5];
    if (signing) {
        const unsigned char *parts[4];
        size_t lens[4];
        char hex[65];
        for (int i = 0; i < 4; i++) parts[i] = r.m.f[d + 2 + i].p, lens[i] = r.m.f[d + 2 + i].n;
        hmac_hex(parts, lens, 4, hex);
        if (r.m.f[d + 1].n != 64 || memcmp(r.m.f[d + 1].p, hex, 64) != 0) {
            fprintf(stderr, "standin: invalid signature on channel %d: message dropped\n", c->ch);
            request_free(&r);
            return;
        }
    }
    if (!json_str((const char *)r.header->p, r.header->n, "msg_type", r.msg_type,
                  sizeof r.msg_type)) {
        request_free(&r);
        return;
    }
    if (c->ch == CH_STDIN) { /* input_reply: nothing ever asks for input */
        request_free(&r);
        return;
    }
    if (c->ch == CH_SHELL && (running.active || queue_head)) { /* busy: wait in line */
        pending_t *p = xrealloc(NULL, sizeof *p);
        p->next = NULL;
        p->r = r;
        *queue_tail = p;
        queue_tail = &p->next;
        return;
    }
    int kept = handle(&r);
    if (kept < 0) exit_now(0);
    if (kept == 2) interrupt();
    if (kept != 1) request_free(&r);
}

/* Parse what arrived: the greeting, then frames; commands are READY, PING, SUBSCRIBE. */
static void on_input(conn_t *c) {
    buf_t *in = &c->in;
    size_t pos = 0;
    if (c->greeting < 64) {
        size_t take = in->len < 64 - c->greeting ? in->len : 64 - c->greeting;
        if (c->greeting == 0 && take > 0 && in->p[0] != 0xff) {
            conn_close(c);
            return;
        }
        c->greeting += (unsigned)take;
        pos = take;
    }
    while (c->greeting == 64 && !c->dead) {
        if (in->len - pos < 2) break;
        unsigned char flags = in->p[pos];
        size_t hl = (flags & 2) ? 9 : 2, n = 0;
        if (in->len - pos < hl) break;
        if (flags & 2)
            for (int i = 0; i < 8; i++) n = n << 8 | in->p[pos + 1 + i];
        else
            n = in->p[pos + 1];
        if (in->len - pos - hl < n) break;
        unsigned char *body = in->p + pos + hl;
        pos += hl + n;
        if (flags & 4) { /* command: name length, name, data */
            size_t nl = n ? body[0] : 0;
            if (nl + 1 > n) continue;
            if (nl == 5 && memcmp(body + 1, "READY", 5) == 0) {
                c->ready = 1;
            } else if (nl == 4 && memcmp(body + 1, "PING", 4) == 0) {
                unsigned char pong[32] = "\x04PONG";
                size_t ctx = n > 7 ? n - 7 : 0; /* after name and the 2-byte TTL */
                if (ctx > 16) ctx = 16;
                memcpy(pong + 5, body + 7, ctx);
                put_frame(&c->out, pong, 5 + ctx, 0, 1);
            } else if (nl == 9 && memcmp(body + 1, "SUBSCRIBE", 9) == 0) {
                c->subscribed = 1;
            } else if (nl == 5 && memcmp(body + 1, "ERROR", 5) == 0) {
                conn_close(c);
            }
            continue;
        }
        msg_add(&c->cur, body, n);
        if (!(flags & 1)) {
            msg_t m = c->cur;
            memset(&c->cur, 0, sizeof c->cur);
            on_message(c, &m);
        }
    }
    if (c->dead) return;
    memmove(in->p, in->p + pos, in->len - pos);
    in->len -= pos;
    if (in->len == 0 && in->cap > 65536) buf_free(in);
}

static void on_readable(conn_t *c) {
    for (;;) {
        if (c->in.cap - c->in.len < 4096) {
            c->in.cap = c->in.cap ? c->in.cap * 2 : 4096;
            c->in.p = xrealloc(c->in.p, c->in.cap);
        }
        ssize_t r = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, 0);
        if (r > 0) {
            c->in.len += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EAGAIN) break;
        on_input(c); /* what came before the end */
        conn_close(c);
        return;
    }
    on_input(c);
}

static void on_accept(conn_t *l) {
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = xrealloc(NULL, sizeof *c);
        memset(c, 0, sizeof *c);
        c->kind = K_CONN, c->fd = fd, c->ch = l->ch, c->id = next_conn_id++;
        c->next = conns;
        conns = c;
        /* our greeting (version 3.0, NULL mechanism), then READY with our socket type */
        unsigned char g[64] = {0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0, 'N', 'U', 'L', 'L'};
        buf_put(&c->out, g, 64);
        unsigned char ready[64];
        const char *type = CH_TYPE[l->ch];
        size_t tl = strlen(type), n = 0;
        ready[n++] = 5;
        memcpy(ready + n, "READY", 5), n += 5;
        ready[n++] = 11;
        memcpy(ready + n, "Socket-Type", 11), n += 11;
        ready[n++] = 0, ready[n++] = 0, ready[n++] = 0, ready[n++] = (unsigned char)tl;
        memcpy(ready + n, type, tl), n += tl;
        put_frame(&c->out, ready, n, 0, 1);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        conn_flush(c);
    }
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open connection file %s: %s", path, strerror(errno));
    char *data = NULL;
    size_t n = 0, cap = 0, r;
    do {
        if (cap - n < 4096) data = xrealloc(data, cap += 4096);
        r = fread(data + n, 1, cap - n, f);
        n += r;
    } while (r > 0);
    fclose(f);
    *len = n;
    return data;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: standin CONNECTION_FILE\n");
        return 2;
    }
    size_t n;
    char *cf = read_file(argv[1], &n), ip[64], key[256], scheme[64] = "hmac-sha256",
         transport[16] = "tcp";
    if (!json_str(cf, n, "ip", ip, sizeof ip)) strcpy(ip, "127.0.0.1");
    if (!json_str(cf, n, "key", key, sizeof key)) key[0] = 0;
    json_str(cf, n, "signature_scheme", scheme, sizeof scheme);
    json_str(cf, n, "transport", transport, sizeof transport);
    if (strcmp(transport, "tcp") != 0) die("transport %s: only tcp is supported", transport);
    if (key[0] && strcmp(scheme, "hmac-sha256") != 0) die("signature scheme %s unsupported", scheme);
    hmac_setkey(key, strlen(key));

    unsigned char rnd[16];
    int rf = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (rf < 0 || read(rf, rnd, sizeof rnd) != (ssize_t)sizeof rnd) die("no /dev/urandom");
    close(rf);
    for (int i = 0; i < 16; i++) sprintf(session_id + 2 * i, "%02x", rnd[i]);

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigprocmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(EPOLL_CLOEXEC);
    static conn_t sig_conn = {.kind = K_SIGNAL};
    sig_conn.fd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &sig_conn};
    epoll_ctl(ep, EPOLL_CTL_ADD, sig_conn.fd, &ev);

    static conn_t listeners[NCH];
    struct sockaddr_in addr = {.sin_family = AF_INET};
    const char *bind_ip = strcmp(ip, "*") == 0 || strcmp(ip, "localhost") == 0 ? "127.0.0.1" : ip;
    if (strcmp(ip, "*") == 0) bind_ip = "0.0.0.0";
    if (inet_pton(AF_INET, bind_ip, &addr.sin_addr) != 1) die("ip %s: not an IPv4 address", ip);
    for (int ch = 0; ch < NCH; ch++) {
        long port = json_int(cf, n, CH_PORT[ch], 0);
        if (port <= 0 || port > 65535) die("%s missing or 0 in %s", CH_PORT[ch], argv[1]);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        addr.sin_port = htons((uint16_t)port);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("binding %s %s:%ld: %s", CH_PORT[ch], bind_ip, port, strerror(errno));
        if (listen(fd, 64) < 0) die("listen: %s", strerror(errno));
        listeners[ch] = (conn_t){.kind = K_LISTEN, .fd = fd, .ch = ch};
        ev = (struct epoll_event){.events = EPOLLIN, .data.ptr = &listeners[ch]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    free(cf);

    struct epoll_event evs[64];
    for (;;) {
        int timeout = -1;
        if (running.active) {
            double left = running.until - now_s();
            timeout = left <= 0 ? 0 : (int)(left * 1000) + 1;
        }
        int k = epoll_wait(ep, evs, 64, timeout);
        for (int i = 0; i < k; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->kind == K_LISTEN) {
                on_accept(c);
            } else if (c->kind == K_SIGNAL) {
                struct signalfd_siginfo si;
                while (read(c->fd, &si, sizeof si) == (ssize_t)sizeof si) {
                    if (si.ssi_signo == SIGTERM) exit_now(0);
                    if (si.ssi_signo == SIGINT) interrupt();
                }
            } else if (!c->dead) {
                if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
                if (!c->dead && (evs[i].events & EPOLLOUT)) conn_flush(c);
            }
        }
        if (running.active && now_s() >= running.until) {
            running.active = 0;
            finish_execute(&running.r, running.count, 0);
            request_free(&running.r);
        }
        run_queue();
        flush_all();
        while (dead_conns) {
            conn_t *c = dead_conns;
            dead_conns = c->next;
            buf_free(&c->in);
            buf_free(&c->out);
            msg_free(&c->cur);
            free(c);
        }
    }
}
