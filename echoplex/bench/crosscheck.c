/*
 * echoplex-crosscheck: a second, independent load generator for `echoplex bench
 * --cross-check`. It shares no code with `echoplex load`: C, epoll, one thread.
 *
 *   echoplex-crosscheck HOST PORT CONNECTIONS SIZE DURATION_S WARMUP_S
 *
 * Ping-pong: each of CONNECTIONS connections sends SIZE bytes, waits until all of them
 * have come back, and sends the next SIZE bytes, for WARMUP_S seconds unmeasured and
 * then DURATION_S seconds measured. Every echoed byte is checked: connection c sends
 * the bytes of a fixed pseudo-random block of prime length starting at its own
 * offset, so the echo of stream offset i must be block[(start(c) + i) % BLOCK], and a
 * lost, repeated, reordered or corrupted byte is a mismatch at a known offset. After
 * the measured time no new message is sent, and the echoes still due get GRACE_S
 * seconds to come back (a dropped byte is caught here: it never arrives).
 *
 * Prints one JSON object: requests and bytes echoed in the measured time, their
 * rates, errors by kind, mismatches (the first few: connection, offset, expected,
 * received), connections alive at the end, and its own CPU time. Exit status 0 when
 * every byte came back right, 1 otherwise, 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 1000003u   /* prime, so no plausible loss lines the stream back up */
#define STRIDE 7919u     /* spreads the connections' starting points over the block */
#define MAX_SIZE (16u << 20)
#define MAX_CONNECTIONS 100000
#define MAX_SAMPLES 5
#define READ_BYTES 65536
#define GRACE_S 2.0
#define CONNECT_TIMEOUT_S 10.0

enum kind { CONNECT, RESET, CLOSED_EARLY, EXTRA_BYTES, TIMEOUT, KINDS };
static const char *kind_names[KINDS] = {"connect", "reset", "closed early", "extra bytes",
                                        "timeout"};

struct conn {
    int fd;
    int open;          /* connected, not failed */
    uint32_t start;    /* where its stream starts in the block */
    uint64_t sent;     /* stream bytes written */
    uint64_t due;      /* stream bytes to write: the end of the current message */
    uint64_t checked;  /* stream bytes echoed and verified */
    int want_out;      /* registered for EPOLLOUT */
};

struct sample {
    int connection;
    uint64_t offset;
    unsigned expected, received;
};

static unsigned char block[2 * BLOCK]; /* twice over: any slice up to BLOCK is contiguous */
static uint64_t size;
static long errors[KINDS], mismatches;
static struct sample samples[MAX_SAMPLES];
static int epfd;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fill_block(void)
{
    uint64_t x = 0x9E3779B97F4A7C15ull; /* xorshift64: any fixed sequence will do */
    for (unsigned i = 0; i < BLOCK; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        block[i] = (unsigned char)(x >> 24);
    }
    memcpy(block + BLOCK, block, BLOCK);
}

static const unsigned char *stream_at(const struct conn *c, uint64_t offset)
{
    return block + (c->start + offset) % BLOCK;
}

static void fail(struct conn *c, enum kind kind)
{
    if (!c->open)
        return;
    errors[kind]++;
    c->open = 0;
    close(c->fd);
}

static void watch(struct conn *c, int index, int out)
{
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = index};
    if (c->want_out != out) {
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = out;
    }
}

/* Write what is due; register for EPOLLOUT while the socket's buffer is full. */
static void send_due(struct conn *c, int index)
{
    while (c->open && c->sent < c->due) {
        uint64_t length = c->due - c->sent;
        if (length > BLOCK)
            length = BLOCK;
        ssize_t n = send(c->fd, stream_at(c, c->sent), length, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR)
                continue;
            fail(c, RESET);
            return;
        }
        c->sent += (uint64_t)n;
    }
    if (c->open)
        watch(c, index, c->sent < c->due);
}

/* Check `n` echoed bytes against the stream; 0 on the first wrong one. */
static int verify(struct conn *c, int index, const unsigned char *data, size_t n)
{
    size_t done = 0;
    while (done < n) {
        size_t length = n - done;
        if (length > BLOCK)
            length = BLOCK;
        const unsigned char *want = stream_at(c, c->checked + done);
        if (memcmp(data + done, want, length) != 0) {
            size_t at = 0;
            while (data[done + at] == want[at])
                at++;
            if (mismatches < MAX_SAMPLES)
                samples[mismatches] = (struct sample){index, c->checked + done + at, want[at],
                                                      data[done + at]};
            mismatches++;
            c->open = 0;
            close(c->fd);
            return 0;
        }
        done += length;
    }
    c->checked += n;
    return 1;
}

static double cpu_now_s(void)
{
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec +
           usage.ru_stime.tv_usec / 1e6;
}

static int parse_number(const char *text, double *value)
{
    char *end;
    errno = 0;
    *value = strtod(text, &end);
    return errno == 0 && end != text && *end == '\0' && *value >= 0;
}

int main(int argc, char **argv)
{
    double connections_d, size_d, duration, warmup;
    if (argc != 7 || !parse_number(argv[3], &connections_d) || !parse_number(argv[4], &size_d) ||
        !parse_number(argv[5], &duration) || !parse_number(argv[6], &warmup) ||
        connections_d < 1 || connections_d > MAX_CONNECTIONS || size_d < 1 ||
        size_d > MAX_SIZE || duration <= 0) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS SIZE DURATION_S WARMUP_S\n", argv[0]);
        return 2;
    }
    int count = (int)connections_d, port = atoi(argv[2]);
    size = (uint64_t)size_d;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, argv[1], &address.sin_addr) != 1 || port < 1 || port > 65535) {
        fprintf(stderr, "%s: HOST must be an IPv4 address and PORT 1-65535\n", argv[0]);
        return 2;
    }
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    fill_block();
    struct conn *conns = calloc((size_t)count, sizeof *conns);
    unsigned char *buffer = malloc(READ_BYTES);
    struct epoll_event *events = calloc((size_t)count, sizeof *events);
    epfd = epoll_create1(0);
    if (!conns || !buffer || !events || epfd < 0) {
        perror("echoplex-crosscheck");
        return 1;
    }

    /* Connect them all, then send the first message on each once all are open. */
    int connecting = 0;
    for (int i = 0; i < count; i++) {
        struct conn *c = &conns[i];
        c->start = (uint32_t)(((uint64_t)i * STRIDE) % BLOCK);
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        if (c->fd < 0) {
            errors[CONNECT]++;
            continue;
        }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, (struct sockaddr *)&address, sizeof address) < 0 &&
            errno != EINPROGRESS) {
            errors[CONNECT]++;
            close(c->fd);
            continue;
        }
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
        c->want_out = 1;
        c->open = 1;
        connecting++;
    }
    double deadline = now_s() + CONNECT_TIMEOUT_S;
    while (connecting > 0 && now_s() < deadline) {
        int n = epoll_wait(epfd, events, count, 100);
        for (int e = 0; e < n; e++) {
            struct conn *c = &conns[events[e].data.u32];
            int error = 0;
            socklen_t length = sizeof error;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &length);
            if (error)
                fail(c, CONNECT);
            else
                watch(c, (int)events[e].data.u32, 0);
            connecting--;
        }
    }
    for (int i = 0; i < count; i++)
        if (conns[i].open && conns[i].want_out)
            fail(&conns[i], CONNECT); /* still connecting */

    double started = now_s();
    double measure_from = started + warmup, measure_to = measure_from + duration;
    long requests = 0;
    for (int i = 0; i < count; i++) {
        conns[i].due = size;
        send_due(&conns[i], i);
    }
    int sending = 1, measuring = 0;
    double stop_at = measure_to + GRACE_S, cpu_from = 0, cpu_to = 0;
    for (;;) {
        double t = now_s();
        if (!measuring && t >= measure_from) {
            measuring = 1;
            cpu_from = cpu_now_s();
        }
        if (sending && t >= measure_to) {
            sending = 0;
            cpu_to = cpu_now_s();
        }
        int outstanding = 0;
        if (!sending) {
            for (int i = 0; i < count; i++)
                outstanding += conns[i].open && conns[i].checked < conns[i].sent;
            if (!outstanding || t >= stop_at)
                break;
        }
        int n = epoll_wait(epfd, events, count, 10);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        for (int e = 0; e < n; e++) {
            int index = (int)events[e].data.u32;
            struct conn *c = &conns[index];
            if (!c->open)
                continue;
            if (events[e].events & EPOLLOUT)
                send_due(c, index);
            if (!(events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) || !c->open)
                continue;
            ssize_t got = recv(c->fd, buffer, READ_BYTES, 0);
            if (got < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                    fail(c, RESET);
                continue;
            }
            if (got == 0) {
                fail(c, CLOSED_EARLY);
                continue;
            }
            uint64_t expected = c->sent - c->checked;
            if ((uint64_t)got > expected) {
                /* Check what was owed, then the rest is bytes never sent. */
                if (verify(c, index, buffer, expected))
                    fail(c, EXTRA_BYTES);
                continue;
            }
            if (!verify(c, index, buffer, (size_t)got))
                continue;
            if (c->checked == c->due) {
                double done_at = now_s();
                if (done_at >= measure_from && done_at < measure_to)
                    requests++;
                if (sending) {
                    c->due += size;
                    send_due(c, index);
                }
            }
        }
    }
    int alive = 0;
    for (int i = 0; i < count; i++) {
        if (conns[i].open && conns[i].checked < conns[i].sent)
            fail(&conns[i], TIMEOUT); /* its echo never came back whole */
        alive += conns[i].open;
    }

    /* Its own CPU over the measured time, as `echoplex load` reports its own. */
    double cpu_s = cpu_to - cpu_from;
    long error_total = 0;
    for (int k = 0; k < KINDS; k++)
        error_total += errors[k];
    printf("{\"generator\": \"echoplex-crosscheck\", \"connections\": %d, \"size\": %llu, "
           "\"duration_s\": %g, \"warmup_s\": %g, \"requests\": %ld, \"requests_per_s\": %.3f, "
           "\"bytes\": %llu, \"mb_per_s\": %.6f, \"errors\": %ld, \"errors_by_kind\": {",
           count, (unsigned long long)size, duration, warmup, requests, requests / duration,
           (unsigned long long)(requests * size), requests * (double)size / duration / 1e6,
           error_total);
    const char *comma = "";
    for (int k = 0; k < KINDS; k++)
        if (errors[k]) {
            printf("%s\"%s\": %ld", comma, kind_names[k], errors[k]);
            comma = ", ";
        }
    printf("}, \"mismatches\": %ld, \"mismatch_samples\": [", mismatches);
    for (long m = 0; m < mismatches && m < MAX_SAMPLES; m++)
        printf("%s{\"connection\": %d, \"offset\": %llu, \"expected\": %u, \"received\": %u}",
               m ? ", " : "", samples[m].connection, (unsigned long long)samples[m].offset,
               samples[m].expected, samples[m].received);
    printf("], \"connections_alive\": %d, \"client_cpu_s\": %.6f, "
           "\"client_cpu_us_per_request\": %.3f}\n",
           alive, cpu_s, requests ? 1e6 * cpu_s / requests : 0.0);
    return error_total || mismatches ? 1 : 0;
}
