/*
 * upstream.c - single-threaded epoll upstream server for bench/run_proxy_bench.py.
 *
 *   --reqresp HOST:PORT  read a request up to its blank line (CRLFCRLF), write a
 *                        --resp-size byte HTTP response, close.  Connections that
 *                        never send a request are held open (idle tunnels).
 *   --source HOST:PORT   write bytes as fast as possible until the client closes.
 *
 * Either or both listeners may be given.  Prints "ready" on stdout once listening.
 * Build: gcc -O2 -Wall -o upstream upstream.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

enum kind { K_NONE, K_LISTEN_RR, K_LISTEN_SRC, K_RR, K_SRC };

struct fdstate {
    uint8_t kind;
    char tail[3];      /* last bytes seen, to find CRLFCRLF across reads */
    uint8_t tail_len;
    uint16_t out_off;  /* reqresp: bytes of response already written */
};

static struct fdstate *fds;
static size_t max_fds;
static int ep;
static char *resp;
static int resp_size = 350;
static char src_buf[1 << 18];
static char rbuf[1 << 16];
static volatile sig_atomic_t stop_flag;

static void die(const char *msg) {
    fprintf(stderr, "upstream: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static int listen_on(const char *spec, int kind) {
    char host[64];
    const char *colon;
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    if (spec[0] == '[') {
        const char *end = strchr(spec, ']');
        if (!end) { fprintf(stderr, "bad address %s\n", spec); exit(2); }
        snprintf(host, sizeof host, "%.*s", (int)(end - spec - 1), spec + 1);
        colon = end + 1;
    } else {
        colon = strrchr(spec, ':');
        if (!colon) { fprintf(stderr, "bad address %s\n", spec); exit(2); }
        snprintf(host, sizeof host, "%.*s", (int)(colon - spec), spec);
    }
    int port = atoi(colon + 1);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET; a4->sin_port = htons((uint16_t)port); sl = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6; a6->sin6_port = htons((uint16_t)port); sl = sizeof *a6;
    } else { fprintf(stderr, "bad host %s\n", host); exit(2); }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, sl) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    fds[fd].kind = (uint8_t)kind;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl listen");
    return fd;
}

static void drop(int fd) {
    fds[fd].kind = K_NONE;
    close(fd);
}

static void do_accept(int lfd) {
    int kind = fds[lfd].kind == K_LISTEN_RR ? K_RR : K_SRC;
    for (int i = 0; i < 256; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) return;
            if (errno == EMFILE || errno == ENFILE) { perror("upstream: accept"); return; }
            die("accept");
        }
        if ((size_t)fd >= max_fds) { close(fd); continue; }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        memset(&fds[fd], 0, sizeof fds[fd]);
        fds[fd].kind = (uint8_t)kind;
        struct epoll_event ev = {.events = kind == K_RR ? EPOLLIN : (EPOLLIN | EPOLLOUT), .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl conn");
    }
}

/* Write the rest of the response; close once it is all out.  */
static void rr_write(int fd) {
    struct fdstate *s = &fds[fd];
    while (s->out_off < resp_size) {
        ssize_t n = send(fd, resp + s->out_off, (size_t)(resp_size - s->out_off), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                return;
            }
            drop(fd);
            return;
        }
        s->out_off = (uint16_t)(s->out_off + n);
    }
    drop(fd);
}

static void rr_read(int fd) {
    struct fdstate *s = &fds[fd];
    for (;;) {
        ssize_t n = recv(fd, rbuf, sizeof rbuf, 0);
        if (n < 0) {
            if (errno == EAGAIN) return;
            drop(fd);
            return;
        }
        if (n == 0) { drop(fd); return; }
        /* look for CRLFCRLF in tail + new data */
        char probe[3 + 4];
        int found = 0;
        if (memmem(rbuf, (size_t)n, "\r\n\r\n", 4)) found = 1;
        else {
            size_t k = n < 4 ? (size_t)n : 4;
            memcpy(probe, s->tail, s->tail_len);
            memcpy(probe + s->tail_len, rbuf, k < 4 ? k : 4);
            if (memmem(probe, s->tail_len + (k < 4 ? k : 4), "\r\n\r\n", 4)) found = 1;
        }
        if (found) {
            s->out_off = 0;
            rr_write(fd);
            return;
        }
        /* keep the last 3 bytes */
        if (n >= 3) { memcpy(s->tail, rbuf + n - 3, 3); s->tail_len = 3; }
        else {
            char tmp[6];
            memcpy(tmp, s->tail, s->tail_len);
            memcpy(tmp + s->tail_len, rbuf, (size_t)n);
            int tl = s->tail_len + (int)n;
            int keep = tl < 3 ? tl : 3;
            memcpy(s->tail, tmp + tl - keep, (size_t)keep);
            s->tail_len = (uint8_t)keep;
        }
    }
}

static void src_event(int fd, uint32_t events) {
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        ssize_t n = recv(fd, rbuf, sizeof rbuf, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) { drop(fd); return; }
    }
    if (events & EPOLLOUT) {
        /* a few writes per wakeup keep several streams fair */
        for (int i = 0; i < 8; i++) {
            ssize_t n = send(fd, src_buf, sizeof src_buf, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno != EAGAIN) drop(fd);
                return;
            }
        }
    }
}

int main(int argc, char **argv) {
    const char *rr_addr = NULL, *src_addr = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reqresp") && i + 1 < argc) rr_addr = argv[++i];
        else if (!strcmp(argv[i], "--source") && i + 1 < argc) src_addr = argv[++i];
        else if (!strcmp(argv[i], "--resp-size") && i + 1 < argc) resp_size = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: upstream [--reqresp HOST:PORT] [--source HOST:PORT] [--resp-size B]\n");
            return 2;
        }
    }
    if (!rr_addr && !src_addr) { fprintf(stderr, "nothing to listen on\n"); return 2; }
    if (resp_size < 64 || resp_size > 60000) { fprintf(stderr, "--resp-size must be 64..60000\n"); return 2; }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    max_fds = rl.rlim_cur > (1u << 20) ? (1u << 20) : (size_t)rl.rlim_cur;
    fds = calloc(max_fds, sizeof *fds);

    /* an HTTP response padded to exactly resp_size bytes */
    resp = malloc((size_t)resp_size);
    int hl = snprintf(resp, (size_t)resp_size, "HTTP/1.1 200 OK\r\nContent-Length: %05d\r\nConnection: close\r\n\r\n", 0);
    int body = resp_size - hl;
    snprintf(resp, (size_t)resp_size, "HTTP/1.1 200 OK\r\nContent-Length: %05d\r\nConnection: close\r\n\r\n", body);
    memset(resp + hl, 'b', (size_t)body);
    memset(src_buf, 'x', sizeof src_buf);

    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    if (rr_addr) listen_on(rr_addr, K_LISTEN_RR);
    if (src_addr) listen_on(src_addr, K_LISTEN_SRC);
    printf("ready\n");
    fflush(stdout);

    struct epoll_event evs[512];
    while (!stop_flag) {
        int n = epoll_wait(ep, evs, 512, 200);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            switch (fds[fd].kind) {
            case K_LISTEN_RR:
            case K_LISTEN_SRC: do_accept(fd); break;
            case K_RR:
                if (evs[i].events & EPOLLOUT) rr_write(fd);
                else rr_read(fd);
                break;
            case K_SRC: src_event(fd, evs[i].events); break;
            default: break;
            }
        }
    }
    return 0;
}
