/*
 * grootfs-shim: the image plugin executable Garden runs; all logic stays in Python.
 *
 * It takes exactly grootfs's arguments and hands them, with its environment,
 * working directory, umask and standard descriptors, to the resident
 * `grootfs serve` process (src/grootfs_py/server.py documents the protocol),
 * which forks a child that runs the command on the caller's own descriptors.
 * The shim then waits and exits as the command did: the same exit code, or
 * the same signal raised again.
 *
 * Environment:
 *   GROOTFS_SOCKET                 the server's socket
 *                                  (default /var/vcap/sys/run/grootfs/grootfs.sock)
 *   GROOTFS_PYTHON_CLI             the Python command to fall back to
 *                                  (default /var/vcap/packages/grootfs_py/bin/grootfs)
 *   GROOTFS_SHIM_ACK_TIMEOUT_MS    how long the server has to take the request (default 2000)
 *
 * When the shim falls back: only while the request has not been taken, i.e.
 * before the server's first reply byte. No socket, a refused or stale socket,
 * a connect or send that fails, a server that closes the connection without
 * a word (it refuses other uids, unknown protocol versions, requests it
 * cannot fork for), or no reply within the timeout (a hung server): the shim
 * execs the Python command with the same argv and environment. The result is
 * the same, only slower. Before falling back after a timeout it shuts the
 * connection, and the server never starts a request whose shim is gone.
 *
 * When it does not: once any reply byte arrived the command may have run,
 * so running it again could create or delete twice. If the connection then
 * ends without an exit status (the server died and the command died of a
 * signal with nobody to report it: a command still running keeps the
 * connection open and reports its own status), the shim prints one line and
 * exits 1, a failure Garden answers with a delete.
 *
 * Signals: SIGINT, SIGTERM, SIGHUP and SIGQUIT received after the request was
 * taken are forwarded to the command (a "KILL" record), so it behaves as the
 * Python command would (SIGINT unwinds and exits 1, SIGTERM kills); the shim
 * then dies of the same signal if the command did. Received before that, the
 * shim dies of it at once; the server sees the connection close and starts
 * nothing, or SIGKILLs what it started. A SIGKILLed shim closes its
 * connection too, and the server SIGKILLs its command.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/var/vcap/sys/run/grootfs/grootfs.sock"
#define DEFAULT_CLI "/var/vcap/packages/grootfs_py/bin/grootfs"
#define DEFAULT_ACK_TIMEOUT_MS 2000
#define PROTOCOL_VERSION 1
#define HEADER_SIZE 20
#define RECORD_SIZE 8
#define MAX_REQUEST (1u << 20) /* the server's limit on argv + environ */

extern char **environ;

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
#define NFORWARDED (sizeof forwarded / sizeof forwarded[0])
static volatile sig_atomic_t pending[NFORWARDED];
static sigset_t original_mask; /* restored for the fallback's exec */
static sigset_t poll_mask;     /* the original one, with the forwarded signals let in */

static void on_signal(int sig)
{
    for (size_t i = 0; i < NFORWARDED; i++)
        if (forwarded[i] == sig)
            pending[i] = 1;
}

static const char *env_or(const char *name, const char *fallback)
{
    const char *value = getenv(name);
    return value && *value ? value : fallback;
}

/* Run the Python command in our place: the same argv and environment. */
static void __attribute__((noreturn)) fall_back(char **argv)
{
    const char *cli = env_or("GROOTFS_PYTHON_CLI", DEFAULT_CLI);
    for (size_t i = 0; i < NFORWARDED; i++)
        signal(forwarded[i], SIG_DFL);
    sigprocmask(SIG_SETMASK, &original_mask, NULL);
    argv[0] = (char *)cli;
    execv(cli, argv);
    dprintf(STDOUT_FILENO, "grootfs-shim: cannot run %s: %s\n", cli, strerror(errno));
    _exit(1);
}

/* Die of *sig* as the command did, without a core file of our own. */
static void __attribute__((noreturn)) die_of(int sig)
{
    struct rlimit no_core = {0, 0};
    sigset_t only;
    setrlimit(RLIMIT_CORE, &no_core);
    signal(sig, SIG_DFL);
    sigemptyset(&only);
    sigaddset(&only, sig);
    sigprocmask(SIG_UNBLOCK, &only, NULL);
    raise(sig);
    _exit(128 + sig); /* a signal whose default is to be ignored */
}

static int first_pending(void)
{
    for (size_t i = 0; i < NFORWARDED; i++)
        if (pending[i]) {
            pending[i] = 0;
            return forwarded[i];
        }
    return 0;
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/*
 * Wait until *fd* has *events*, a forwarded signal arrives (returns 0 with
 * a pending signal) or *deadline* passes (-1: none). Returns 1 when ready,
 * 0 on a signal, -1 on timeout. Signals are blocked except inside ppoll, so
 * none is missed between the check and the wait.
 */
static int wait_for(int fd, short events, long long deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        struct timespec ts, *timeout = NULL;
        if (deadline >= 0) {
            long long left = deadline - now_ms();
            if (left <= 0)
                return -1;
            ts.tv_sec = left / 1000;
            ts.tv_nsec = (left % 1000) * 1000000;
            timeout = &ts;
        }
        int n = ppoll(&p, 1, timeout, &poll_mask);
        if (n > 0)
            return 1;
        if (n == 0)
            return -1;
        if (errno != EINTR)
            return 1; /* let the read or write report it */
        for (size_t i = 0; i < NFORWARDED; i++)
            if (pending[i])
                return 0;
    }
}

static unsigned char *build_request(char **argv, size_t *size)
{
    size_t argc = 0, length = 0, envc = 0;
    for (char **a = argv + 1; *a; a++, argc++)
        length += strlen(*a) + 1;
    for (char **e = environ; e && *e; e++, envc++)
        length += strlen(*e) + 1;
    if (length > MAX_REQUEST)
        return NULL;
    unsigned char *buffer = malloc(HEADER_SIZE + length);
    if (!buffer)
        return NULL;
    mode_t mask = umask(0);
    umask(mask);
    memcpy(buffer, "GRFS", 4);
    put32(buffer + 4, PROTOCOL_VERSION);
    put32(buffer + 8, mask);
    put32(buffer + 12, argc);
    put32(buffer + 16, length);
    unsigned char *p = buffer + HEADER_SIZE;
    for (char **a = argv + 1; *a; a++) {
        size_t n = strlen(*a) + 1;
        memcpy(p, *a, n);
        p += n;
    }
    for (size_t i = 0; i < envc; i++) {
        size_t n = strlen(environ[i]) + 1;
        memcpy(p, environ[i], n);
        p += n;
    }
    *size = HEADER_SIZE + length;
    return buffer;
}

/* Connect and send the whole request with our descriptors; 0 on success. */
static int send_request(int sock, const unsigned char *request, size_t size, long long deadline)
{
    const char *path = env_or("GROOTFS_SOCKET", DEFAULT_SOCKET);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof address.sun_path)
        return -1;
    strcpy(address.sun_path, path);
    /* Non-blocking: a server whose backlog is full refuses at once (EAGAIN). */
    if (connect(sock, (struct sockaddr *)&address, sizeof address) != 0)
        return -1;
    int cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd < 0)
        return -1;
    int fds[4] = {STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO, cwd};
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    size_t sent = 0;
    int first = 1, result = -1;
    while (sent < size) {
        struct iovec iov = {.iov_base = (void *)(request + sent), .iov_len = size - sent};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        if (first) {
            msg.msg_control = control.buf;
            msg.msg_controllen = sizeof control.buf;
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof fds);
            memcpy(CMSG_DATA(c), fds, sizeof fds);
        }
        ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n > 0) {
            sent += n;
            first = 0;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            int w = wait_for(sock, POLLOUT, deadline);
            if (w == 0)
                die_of(first_pending());
            if (w < 0)
                goto out;
            continue;
        }
        goto out;
    }
    result = 0;
out:
    close(cwd);
    return result;
}

int main(int argc, char **argv)
{
    (void)argc;
    sigset_t block;
    sigemptyset(&block);
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaddset(&block, forwarded[i]);
    sigprocmask(SIG_BLOCK, &block, &original_mask);
    poll_mask = original_mask;
    struct sigaction action = {.sa_handler = on_signal}; /* no SA_RESTART: ppoll sees EINTR */
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaction(forwarded[i], &action, NULL);
    for (size_t i = 0; i < NFORWARDED; i++)
        sigdelset(&poll_mask, forwarded[i]);

    /* A closed standard descriptor cannot be passed: the Python command copes with it. */
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0)
            fall_back(argv);

    long long timeout = atoll(env_or("GROOTFS_SHIM_ACK_TIMEOUT_MS", "0"));
    long long deadline = now_ms() + (timeout > 0 ? timeout : DEFAULT_ACK_TIMEOUT_MS);
    size_t size;
    unsigned char *request = build_request(argv, &size);
    if (!request)
        fall_back(argv);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0 || send_request(sock, request, size, deadline) != 0)
        fall_back(argv);
    free(request);

    unsigned char record[RECORD_SIZE];
    size_t have = 0;
    int taken = 0;
    for (;;) {
        int w = wait_for(sock, POLLIN, taken ? -1 : deadline);
        if (w < 0) {
            /* No word from the server in time: it will not start us now. */
            shutdown(sock, SHUT_RDWR);
            close(sock);
            fall_back(argv);
        }
        if (w == 0) {
            int sig = first_pending();
            if (!taken)
                die_of(sig);
            unsigned char kill_record[RECORD_SIZE];
            memcpy(kill_record, "KILL", 4);
            put32(kill_record + 4, sig);
            /* An 8-byte record on a socket with room: written whole or not at all. */
            if (send(sock, kill_record, sizeof kill_record, MSG_NOSIGNAL) != sizeof kill_record)
                die_of(sig);
            continue;
        }
        ssize_t n = read(sock, record + have, sizeof record - have);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0) {
            if (!taken)
                fall_back(argv);
            dprintf(STDOUT_FILENO,
                    "grootfs-shim: the grootfs server went away before reporting the "
                    "command's exit status\n");
            return 1;
        }
        taken = 1;
        have += n;
        if (have < sizeof record)
            continue;
        have = 0;
        uint32_t value = get32(record + 4);
        if (memcmp(record, "EXIT", 4) == 0)
            return (int)(value & 0xff);
        if (memcmp(record, "SIGN", 4) == 0)
            die_of((int)value);
        /* "OKAY" (and anything newer we do not know): keep waiting. */
    }
}
