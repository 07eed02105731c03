/*
 * loadgen.c - single-threaded epoll load generator for bench/run_proxy_bench.py.
 *
 * Modes (all print one JSON object per report line on stdout):
 *   rate  keep --concurrency connections in flight; each one connects, does the
 *         proxy handshake (--proto none|connect|socks5), sends a --req-size byte
 *         request, reads the --resp-size byte response until EOF and closes.
 *         Bounded by --count connections AND --seconds.  Latency is connect
 *         start -> first response byte (after the proxy handshake).
 *   bulk  open --streams connections to a "source" upstream (through the proxy)
 *         and read --bytes in all (split evenly); reports MB/s.  Bounded by
 *         --seconds as well.
 *   idle  open --tunnels connections, complete the handshake, then hold them
 *         until stdin reaches EOF or SIGTERM/SIGINT arrives.
 *
 * Build: gcc -O2 -Wall -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum proto { P_NONE, P_CONNECT, P_SOCKS5 };
enum mode { M_RATE, M_BULK, M_IDLE };
enum state {
    S_FREE, S_CONNECTING, S_SEND_HS, S_READ_HTTP, S_READ_S5_GREET, S_SEND_S5_REQ,
    S_READ_S5_REPLY, S_SEND_REQ, S_READ_RESP, S_IDLE
};
enum err { E_CONNECT, E_HANDSHAKE, E_SHORT, E_TIMEOUT, E_RESET, E_COUNT };
static const char *err_names[E_COUNT] = {"connect", "handshake", "short_response", "timeout", "reset"};

struct conn {
    int fd;
    int state;
    uint64_t t0_ns;       /* connect start */
    uint64_t deadline_ns; /* 0 = none */
    const char *out;      /* pending output */
    size_t out_len, out_off;
    char hs[600];         /* handshake reply accumulator */
    size_t hs_len;
    uint64_t got;         /* response / bulk bytes */
    uint64_t want;        /* bulk: bytes to read */
    int first_seen;
};

static struct {
    enum mode mode;
    enum proto proto;
    struct sockaddr_storage target;
    socklen_t target_len;
    char dest_host[64];
    int dest_port;
    struct in_addr dest4;
    struct in6_addr dest6;
    int dest_is6;
    int concurrency, streams, tunnels;
    uint64_t count, bytes;
    double seconds, timeout_s;
    int req_size, resp_size;
    int wait_eof;
} cfg = {
    .mode = M_RATE, .proto = P_NONE, .concurrency = 1, .streams = 1, .tunnels = 100,
    .count = 1000000, .bytes = 1ull << 30, .seconds = 10.0, .timeout_s = 10.0,
    .req_size = 350, .resp_size = 350, .wait_eof = 1,
};

static int ep;
static struct conn *conns;
static int nconns;
static char *req_buf, *connect_buf, *s5_greet, s5_req[32];
static size_t connect_len, s5_req_len;
static uint64_t errors[E_COUNT];
static uint64_t started, completed;
static uint32_t *lat_us;
static uint64_t lat_n, lat_cap;
static uint64_t bulk_total;
static volatile sig_atomic_t stop_flag;
static char scratch[1 << 18];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static int parse_hostport(const char *s, char *host, size_t hostcap, int *port) {
    const char *colon;
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':') return -1;
        size_t n = (size_t)(end - s - 1);
        if (n >= hostcap) return -1;
        memcpy(host, s + 1, n);
        host[n] = 0;
        colon = end + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon) return -1;
        size_t n = (size_t)(colon - s);
        if (n >= hostcap) return -1;
        memcpy(host, s, n);
        host[n] = 0;
    }
    *port = atoi(colon + 1);
    return (*port > 0 && *port < 65536) ? 0 : -1;
}

static void set_target(const char *s) {
    char host[64];
    int port;
    if (parse_hostport(s, host, sizeof host, &port)) { fprintf(stderr, "bad --target %s\n", s); exit(2); }
    memset(&cfg.target, 0, sizeof cfg.target);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&cfg.target;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&cfg.target;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        cfg.target_len = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        cfg.target_len = sizeof *a6;
    } else { fprintf(stderr, "bad --target host %s\n", host); exit(2); }
}

static void set_dest(const char *s) {
    if (parse_hostport(s, cfg.dest_host, sizeof cfg.dest_host, &cfg.dest_port)) {
        fprintf(stderr, "bad --dest %s\n", s); exit(2);
    }
    if (inet_pton(AF_INET, cfg.dest_host, &cfg.dest4) == 1) cfg.dest_is6 = 0;
    else if (inet_pton(AF_INET6, cfg.dest_host, &cfg.dest6) == 1) cfg.dest_is6 = 1;
    else { fprintf(stderr, "--dest must be an IP literal\n"); exit(2); }
}

static void build_messages(void) {
    /* request: an HTTP-looking GET padded to exactly req_size bytes, ending in CRLFCRLF */
    req_buf = malloc((size_t)cfg.req_size + 1);
    const char *head = "GET /bench HTTP/1.1\r\nHost: upstream\r\nX-Pad: ";
    size_t hl = strlen(head);
    if ((size_t)cfg.req_size < hl + 4) { fprintf(stderr, "--req-size too small\n"); exit(2); }
    memcpy(req_buf, head, hl);
    memset(req_buf + hl, 'a', (size_t)cfg.req_size - hl - 4);
    memcpy(req_buf + cfg.req_size - 4, "\r\n\r\n", 4);

    connect_buf = malloc(256);
    const char *fmt = cfg.dest_is6 ? "CONNECT [%s]:%d HTTP/1.1\r\nHost: [%s]:%d\r\n\r\n"
                                   : "CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n";
    connect_len = (size_t)snprintf(connect_buf, 256, fmt, cfg.dest_host, cfg.dest_port,
                                   cfg.dest_host, cfg.dest_port);

    static char greet[3] = {5, 1, 0};
    s5_greet = greet;
    s5_req[0] = 5; s5_req[1] = 1; s5_req[2] = 0;
    if (cfg.dest_is6) {
        s5_req[3] = 4; memcpy(s5_req + 4, &cfg.dest6, 16);
        s5_req[20] = (char)(cfg.dest_port >> 8); s5_req[21] = (char)(cfg.dest_port & 0xff);
        s5_req_len = 22;
    } else {
        s5_req[3] = 1; memcpy(s5_req + 4, &cfg.dest4, 4);
        s5_req[8] = (char)(cfg.dest_port >> 8); s5_req[9] = (char)(cfg.dest_port & 0xff);
        s5_req_len = 10;
    }
}

static void ep_set(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void conn_close(struct conn *c, int rst) {
    if (c->fd >= 0) {
        if (rst) {
            struct linger lg = {1, 0};
            setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close(c->fd); /* also removes it from epoll */
    }
    c->fd = -1;
    c->state = S_FREE;
}

static void start_send(struct conn *c, int state, const char *buf, size_t len) {
    c->state = state;
    c->out = buf;
    c->out_len = len;
    c->out_off = 0;
    ep_set(c, EPOLLOUT, EPOLL_CTL_MOD);
}

static void after_handshake(struct conn *c);

static int conn_start(struct conn *c) {
    memset(c, 0, sizeof *c);
    c->fd = socket(cfg.target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        if (errno == EMFILE || errno == ENFILE) die("socket (raise RLIMIT_NOFILE)");
        die("socket");
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->t0_ns = now_ns();
    c->deadline_ns = c->t0_ns + (uint64_t)(cfg.timeout_s * 1e9);
    started++;
    int r = connect(c->fd, (struct sockaddr *)&cfg.target, cfg.target_len);
    if (r < 0 && errno != EINPROGRESS) {
        errors[E_CONNECT]++;
        close(c->fd);
        c->fd = -1;
        c->state = S_FREE;
        return -1;
    }
    c->state = S_CONNECTING;
    ep_set(c, EPOLLOUT, EPOLL_CTL_ADD);
    return 0;
}

static void on_connected(struct conn *c) {
    switch (cfg.proto) {
    case P_NONE: after_handshake(c); break;
    case P_CONNECT: start_send(c, S_SEND_HS, connect_buf, connect_len); break;
    case P_SOCKS5: start_send(c, S_SEND_HS, s5_greet, 3); break;
    }
}

static void after_handshake(struct conn *c) {
    if (cfg.mode == M_RATE) {
        start_send(c, S_SEND_REQ, req_buf, (size_t)cfg.req_size);
    } else if (cfg.mode == M_BULK) {
        c->state = S_READ_RESP;
        ep_set(c, EPOLLIN, EPOLL_CTL_MOD);
    } else {
        c->state = S_IDLE;
        c->deadline_ns = 0;
        ep_set(c, EPOLLIN, EPOLL_CTL_MOD);
    }
}

/* Returns 1 when a complete, successful handshake reply sits in c->hs; 0 = need more; -1 = bad */
static int http_reply_done(struct conn *c, size_t *extra_off) {
    char *end = memmem(c->hs, c->hs_len, "\r\n\r\n", 4);
    if (!end) return c->hs_len >= sizeof c->hs - 1 ? -1 : 0;
    if (c->hs_len < 12 || memcmp(c->hs, "HTTP/1.", 7) != 0 || memcmp(c->hs + 9, "200", 3) != 0)
        return -1;
    *extra_off = (size_t)(end - c->hs) + 4;
    return 1;
}

static int s5_reply_len(const struct conn *c) {
    if (c->hs_len < 5) return 0;
    switch ((unsigned char)c->hs[3]) {
    case 1: return 10;
    case 4: return 22;
    case 3: return 7 + (unsigned char)c->hs[4];
    default: return -1;
    }
}

static void record_first_byte(struct conn *c) {
    if (!c->first_seen) {
        c->first_seen = 1;
        if (cfg.mode == M_RATE && lat_n < lat_cap) {
            uint64_t us = (now_ns() - c->t0_ns) / 1000;
            lat_us[lat_n++] = us > 0xffffffffu ? 0xffffffffu : (uint32_t)us;
        }
    }
}

static void fail(struct conn *c, int kind) {
    errors[kind]++;
    conn_close(c, 1);
}

/* Bytes that arrived after the handshake reply belong to the response. */
static void take_extra(struct conn *c, size_t off) {
    if (off < c->hs_len) {
        record_first_byte(c);
        c->got += c->hs_len - off;
    }
}

static void on_event(struct conn *c, uint32_t events) {
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & EPOLLERR)) { fail(c, E_CONNECT); return; }
        on_connected(c);
        return;
    }
    if (c->state == S_SEND_HS || c->state == S_SEND_S5_REQ || c->state == S_SEND_REQ) {
        while (c->out_off < c->out_len) {
            ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) return;
                fail(c, c->state == S_SEND_REQ ? E_RESET : E_HANDSHAKE);
                return;
            }
            c->out_off += (size_t)n;
        }
        int next = c->state == S_SEND_REQ ? S_READ_RESP
                 : c->state == S_SEND_S5_REQ ? S_READ_S5_REPLY
                 : cfg.proto == P_CONNECT ? S_READ_HTTP : S_READ_S5_GREET;
        c->state = next;
        c->hs_len = 0;
        ep_set(c, EPOLLIN, EPOLL_CTL_MOD);
        return;
    }
    if (c->state == S_READ_HTTP || c->state == S_READ_S5_GREET || c->state == S_READ_S5_REPLY) {
        size_t want = sizeof c->hs - 1 - c->hs_len;
        if (c->state == S_READ_S5_GREET) want = 2 - c->hs_len; /* never read past the method reply */
        ssize_t n = recv(c->fd, c->hs + c->hs_len, want, 0);
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) { fail(c, E_HANDSHAKE); return; }
        c->hs_len += (size_t)n;
        if (c->state == S_READ_HTTP) {
            size_t off = 0;
            int r = http_reply_done(c, &off);
            if (r < 0) { fail(c, E_HANDSHAKE); return; }
            if (r == 0) return;
            take_extra(c, off);
            after_handshake(c);
        } else if (c->state == S_READ_S5_GREET) {
            if (c->hs_len < 2) return;
            if (c->hs[0] != 5 || c->hs[1] != 0) { fail(c, E_HANDSHAKE); return; }
            start_send(c, S_SEND_S5_REQ, s5_req, s5_req_len);
        } else {
            int need = s5_reply_len(c);
            if (need < 0 || (c->hs_len >= 2 && (c->hs[0] != 5 || c->hs[1] != 0))) { fail(c, E_HANDSHAKE); return; }
            if (need == 0 || c->hs_len < (size_t)need) return;
            take_extra(c, (size_t)need);
            after_handshake(c);
        }
        return;
    }
    if (c->state == S_READ_RESP) {
        for (;;) {
            ssize_t n = recv(c->fd, scratch, sizeof scratch, 0);
            if (n < 0) {
                if (errno != EAGAIN) { fail(c, E_RESET); return; }
                if (cfg.mode == M_RATE && !cfg.wait_eof && c->got >= (uint64_t)cfg.resp_size) break;
                return;
            }
            if (n == 0) break; /* EOF */
            record_first_byte(c);
            c->got += (uint64_t)n;
            if (cfg.mode == M_BULK) {
                bulk_total += (uint64_t)n;
                if (c->got >= c->want) { completed++; conn_close(c, 1); return; }
            } else if (!cfg.wait_eof && c->got >= (uint64_t)cfg.resp_size) {
                break;
            }
        }
        if (cfg.mode == M_RATE) {
            if (c->got != (uint64_t)cfg.resp_size) { fail(c, E_SHORT); return; }
            completed++;
            conn_close(c, !cfg.wait_eof); /* after EOF we are the passive closer: no TIME_WAIT */
        } else {
            fail(c, E_SHORT); /* bulk: EOF before we had our bytes */
        }
        return;
    }
    if (c->state == S_IDLE) {
        ssize_t n = recv(c->fd, scratch, sizeof scratch, 0);
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) fail(c, E_RESET); /* tunnel closed under us */
    }
}

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static uint32_t pct(double p) {
    if (!lat_n) return 0;
    uint64_t i = (uint64_t)(p * (double)(lat_n - 1) + 0.5);
    return lat_us[i];
}

static void print_errors(void) {
    uint64_t total = 0;
    for (int i = 0; i < E_COUNT; i++) total += errors[i];
    printf("\"errors\":%llu,\"error_kinds\":{", (unsigned long long)total);
    for (int i = 0; i < E_COUNT; i++)
        printf("%s\"%s\":%llu", i ? "," : "", err_names[i], (unsigned long long)errors[i]);
    printf("}");
}

static void expire(uint64_t t) {
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->state != S_FREE && c->deadline_ns && t > c->deadline_ns) fail(c, E_TIMEOUT);
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --mode rate|bulk|idle --target HOST:PORT [--dest IP:PORT]\n"
            "  [--proto none|connect|socks5] [--concurrency N] [--count N] [--seconds S]\n"
            "  [--streams K] [--bytes N] [--tunnels N] [--req-size B] [--resp-size B]\n"
            "  [--timeout S] [--no-wait-eof]\n");
    exit(2);
}

int main(int argc, char **argv) {
    int have_target = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && ++i)
        if (OPT("--mode")) {
            cfg.mode = !strcmp(v, "rate") ? M_RATE : !strcmp(v, "bulk") ? M_BULK : !strcmp(v, "idle") ? M_IDLE : (usage(), M_RATE);
        } else if (OPT("--proto")) {
            cfg.proto = !strcmp(v, "none") ? P_NONE : !strcmp(v, "connect") ? P_CONNECT : !strcmp(v, "socks5") ? P_SOCKS5 : (usage(), P_NONE);
        } else if (OPT("--target")) { set_target(v); have_target = 1; }
        else if (OPT("--dest")) set_dest(v);
        else if (OPT("--concurrency")) cfg.concurrency = atoi(v);
        else if (OPT("--count")) cfg.count = strtoull(v, NULL, 10);
        else if (OPT("--seconds")) cfg.seconds = atof(v);
        else if (OPT("--streams")) cfg.streams = atoi(v);
        else if (OPT("--bytes")) cfg.bytes = strtoull(v, NULL, 10);
        else if (OPT("--tunnels")) cfg.tunnels = atoi(v);
        else if (OPT("--req-size")) cfg.req_size = atoi(v);
        else if (OPT("--resp-size")) cfg.resp_size = atoi(v);
        else if (OPT("--timeout")) cfg.timeout_s = atof(v);
        else if (strcmp(a, "--no-wait-eof") == 0) cfg.wait_eof = 0;
        else usage();
#undef OPT
    }
    if (!have_target || cfg.concurrency < 1 || cfg.streams < 1 || cfg.tunnels < 1) usage();
    if (cfg.proto != P_NONE && !cfg.dest_port) { fprintf(stderr, "--dest is required with a proxy protocol\n"); exit(2); }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    build_messages();
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");

    /* idle mode opens tunnels in batches of this many handshakes in flight */
    int inflight_cap = 256;
    nconns = cfg.mode == M_RATE ? cfg.concurrency : cfg.mode == M_BULK ? cfg.streams : cfg.tunnels;
    conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) { conns[i].fd = -1; conns[i].state = S_FREE; }
    if (cfg.mode == M_RATE) {
        lat_cap = cfg.count < 20000000ull ? cfg.count : 20000000ull;
        lat_us = malloc(lat_cap * sizeof *lat_us);
    }

    struct epoll_event evs[512];
    uint64_t t_start = now_ns();
    uint64_t t_end = t_start + (uint64_t)(cfg.seconds * 1e9);
    uint64_t last_expire = t_start;
    int next_idle = 0;   /* idle mode: next conn slot to open */
    int stopped_early = 0;

    if (cfg.mode == M_BULK) {
        uint64_t per = cfg.bytes / (uint64_t)cfg.streams;
        for (int i = 0; i < nconns; i++) {
            conn_start(&conns[i]);
            conns[i].want = per;
            conns[i].deadline_ns = 0; /* bounded by --seconds instead */
        }
    }

    for (;;) {
        uint64_t t = now_ns();
        if (stop_flag) { stopped_early = 1; break; }
        if (cfg.mode == M_RATE) {
            int active = 0;
            for (int i = 0; i < nconns; i++) {
                struct conn *c = &conns[i];
                if (c->state == S_FREE && started < cfg.count && t < t_end) conn_start(c);
                if (c->state != S_FREE) active++;
            }
            if (!active) break;
        } else if (cfg.mode == M_BULK) {
            int active = 0;
            for (int i = 0; i < nconns; i++) active += conns[i].state != S_FREE;
            if (!active) break;
            if (t > t_end) { stopped_early = 1; break; }
        } else {
            int pending = 0;
            for (int i = 0; i < next_idle; i++) {
                int s = conns[i].state;
                pending += s != S_FREE && s != S_IDLE;
            }
            while (next_idle < nconns && pending < inflight_cap) { conn_start(&conns[next_idle++]); pending++; }
            if (next_idle == nconns && pending == 0) break;
            if (t > t_end + (uint64_t)(cfg.timeout_s * 1e9)) { stopped_early = 1; break; }
        }
        int n = epoll_wait(ep, evs, 512, 50);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->state != S_FREE) on_event(c, evs[i].events);
        }
        t = now_ns();
        if (t - last_expire > 100000000ull) { expire(t); last_expire = t; }
    }
    double elapsed = (double)(now_ns() - t_start) / 1e9;

    if (cfg.mode == M_RATE) {
        qsort(lat_us, lat_n, sizeof *lat_us, cmp_u32);
        printf("{\"mode\":\"rate\",\"connections\":%llu,\"elapsed_s\":%.3f,\"conn_per_s\":%.1f,"
               "\"p50_us\":%u,\"p90_us\":%u,\"p99_us\":%u,\"max_us\":%u,",
               (unsigned long long)completed, elapsed, completed / elapsed,
               pct(0.50), pct(0.90), pct(0.99), lat_n ? lat_us[lat_n - 1] : 0);
        print_errors();
        printf("}\n");
    } else if (cfg.mode == M_BULK) {
        printf("{\"mode\":\"bulk\",\"streams\":%d,\"bytes\":%llu,\"elapsed_s\":%.3f,\"mb_per_s\":%.1f,"
               "\"completed_streams\":%llu,\"stopped_early\":%s,",
               cfg.streams, (unsigned long long)bulk_total, elapsed, bulk_total / elapsed / 1e6,
               (unsigned long long)completed, stopped_early ? "true" : "false");
        print_errors();
        printf("}\n");
        for (int i = 0; i < nconns; i++) if (conns[i].state != S_FREE) conn_close(&conns[i], 1);
    } else {
        int open_n = 0;
        for (int i = 0; i < nconns; i++) open_n += conns[i].state == S_IDLE;
        printf("{\"mode\":\"idle\",\"requested\":%d,\"open\":%d,\"elapsed_s\":%.3f,\"stopped_early\":%s,",
               cfg.tunnels, open_n, elapsed, stopped_early ? "true" : "false");
        print_errors();
        printf("}\n");
        fflush(stdout);
        /* hold until stdin closes or a signal; notice tunnels the proxy drops meanwhile */
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        while (!stop_flag) {
            int pr = poll(&pfd, 1, 0);
            if (pr > 0) {
                ssize_t r = read(0, scratch, sizeof scratch);
                if (r <= 0) break;
            }
            int n = epoll_wait(ep, evs, 512, 100);
            for (int i = 0; i < n; i++) {
                struct conn *c = evs[i].data.ptr;
                if (c->state != S_FREE) on_event(c, evs[i].events);
            }
        }
        open_n = 0;
        for (int i = 0; i < nconns; i++) open_n += conns[i].state == S_IDLE;
        printf("{\"mode\":\"idle_end\",\"still_open\":%d}\n", open_n);
        for (int i = 0; i < nconns; i++) if (conns[i].state != S_FREE) conn_close(&conns[i], 1);
    }
    fflush(stdout);
    return 0;
}
