/*
 * The plugin's compiled client: hands a call to the fork server, or runs the
 * Python plugin when no server can take it.
 *
 * gpbackup starts the plugin once per table and segment. A warm call through
 * the fork server costs ~5 ms in its worker, but ~12 ms of Python starting the
 * client that only passes the call on (forkserver.delegate). This program is
 * that client in C, the way Mercurial's chg fronts its command server: it
 * speaks the same protocol to the same socket (forkserver.py is the
 * reference; the names below are its names) and, for anything it does not
 * delegate or at any trouble before the worker has started, execs the Python
 * plugin with the same argv, environment and fds, which then runs the call as
 * it always does (in process, starting a server afterwards).
 *
 * It is a mechanism: it knows which commands take a config (so carry a route),
 * nothing of what they do. Every constant comes from the Python code through
 * launcher_config.h, written by build.py; so does the digest's recipe input
 * (interpreter, its version, package and site directories).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include "launcher_config.h"

extern char **environ;

/* ------------------------------------------------------------ buffers */

struct buffer {
    char *data;
    size_t len, cap;
};

static int grow(struct buffer *b, size_t more) {
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more)
        cap *= 2;
    char *data = realloc(b->data, cap);
    if (data == NULL)
        return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put(struct buffer *b, const void *data, size_t len) {
    if (grow(b, len) < 0)
        return -1;
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

static int puts0(struct buffer *b, const char *text) { return put(b, text, strlen(text)); }

static int putf(struct buffer *b, const char *format, ...) __attribute__((format(printf, 2, 3)));
static int putf(struct buffer *b, const char *format, ...) {
    char text[64];
    va_list args;
    va_start(args, format);
    int len = vsnprintf(text, sizeof text, format, args);
    va_end(args);
    return len < 0 || (size_t)len >= sizeof text ? -1 : put(b, text, (size_t)len);
}

/* ------------------------------------------------------ the fallback */

static char **g_argv;
static int g_argc;

/* Run the Python plugin in this process (pid, fds, environment unchanged): what forkserver.delegate
 * returning None means. After a server of ours was asked (and refused, or failed before the worker
 * started) the Python client does not ask it again. -I as install.sh's script: Greenplum's
 * PYTHONHOME/PYTHONPATH are for its Python 2. */
static void __attribute__((noreturn)) run_python(int server_asked) {
    char **args = calloc((size_t)g_argc + 5, sizeof *args);
    if (args != NULL) {
        args[0] = PYTHON_EXE;
        args[1] = "-I";
        args[2] = "-c";
        /* sys.argv as the console script has it: our own path first (cluster.py runs it on other hosts) */
        args[3] = server_asked
                      ? "import sys; del sys.argv[0]; from sftp_plugin.cli import main; sys.exit(main(ask_server=False))"
                      : "import sys; del sys.argv[0]; from sftp_plugin.cli import main; sys.exit(main())";
        for (int i = 0; i < g_argc; i++)
            args[4 + i] = g_argv[i];
        /* found on PATH: argv[0] is a bare name, where the kernel would have given a script our path */
        static char self[PATH_MAX];
        ssize_t len = strchr(g_argv[0], '/') == NULL ? readlink("/proc/self/exe", self, sizeof self - 1) : -1;
        if (len > 0) {
            self[len] = '\0';
            args[4] = self;
        }
        execv(PYTHON_EXE, args);
    }
    fprintf(stderr, "%s %s: cannot start %s: %s; reinstall the plugin (scripts/install.sh)\n", PLUGIN_NAME,
            g_argc > 1 ? g_argv[1] : "", PYTHON_EXE, strerror(errno));
    exit(1);
}

/* ----------------------------------------------- socket (socket_path) */

/* os.stat_result.st_mtime_ns */
static long long mtime_ns(const struct stat *info) {
    return (long long)info->st_mtim.tv_sec * 1000000000LL + info->st_mtim.tv_nsec;
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int ends_with(const char *text, const char *suffix) {
    size_t n = strlen(text), m = strlen(suffix);
    return n >= m && memcmp(text + n - m, suffix, m) == 0;
}

/* The package's modules, sorted: "<name>:<size>:<mtime_ns>" each (forkserver.digest_of). */
static int put_modules(struct buffer *b) {
    DIR *dir = opendir(PACKAGE_DIR);
    if (dir == NULL)
        return -1;
    char **names = NULL;
    size_t count = 0, cap = 0;
    int rc = 0;
    for (struct dirent *entry; (entry = readdir(dir)) != NULL;) {
        if (!ends_with(entry->d_name, ".py"))
            continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 64;
            char **more = realloc(names, cap * sizeof *names);
            if (more == NULL) { rc = -1; break; }
            names = more;
        }
        if ((names[count] = strdup(entry->d_name)) == NULL) { rc = -1; break; }
        count++;
    }
    closedir(dir);
    if (rc == 0)
        qsort(names, count, sizeof *names, by_name);
    char path[PATH_MAX];
    for (size_t i = 0; i < count && rc == 0; i++) {
        struct stat info;
        if (snprintf(path, sizeof path, "%s/%s", PACKAGE_DIR, names[i]) >= (int)sizeof path ||
            stat(path, &info) < 0) {
            rc = -1;
            break;
        }
        rc = put(b, "", 1) | puts0(b, names[i]) | putf(b, ":%lld:%lld", (long long)info.st_size, mtime_ns(&info));
    }
    for (size_t i = 0; i < count; i++)
        free(names[i]);
    free(names);
    return rc;
}

/* Each dependency's metadata entries "<entry>:<mtime_ns>", from the first site dir holding it
 * (forkserver._dependency_versions): a dir that cannot be listed, or an entry not stat-able, holds nothing. */
static int put_dependencies(struct buffer *b) {
    static const char *const site_dirs[] = SITE_DIRS;
    static const char *const dependencies[] = DEPENDENCIES;
    static const char *const suffixes[] = METADATA_SUFFIXES;
    enum { NDEPS = sizeof dependencies / sizeof *dependencies, NDIRS = sizeof site_dirs / sizeof *site_dirs };
    enum { MAX_ENTRIES = 8 };
    static char found[NDEPS][MAX_ENTRIES][NAME_MAX + 32];
    int found_count[NDEPS] = {0};
    int nfound = 0;
    for (int d = 0; d < NDIRS && nfound < NDEPS; d++) {
        int seen = 0;  /* each dir once, in order (dict.fromkeys) */
        for (int e = 0; e < d; e++)
            seen |= strcmp(site_dirs[e], site_dirs[d]) == 0;
        if (seen)
            continue;
        DIR *dir = opendir(site_dirs[d]);
        if (dir == NULL)
            continue;
        char here[NDEPS][MAX_ENTRIES][NAME_MAX + 32];
        int here_count[NDEPS] = {0};
        int failed = 0;
        for (struct dirent *entry; !failed && (entry = readdir(dir)) != NULL;) {
            const char *name = entry->d_name;
            int metadata = 0;
            for (size_t s = 0; metadata == 0 && s < sizeof suffixes / sizeof *suffixes; s++)
                metadata = ends_with(name, suffixes[s]);
            if (!metadata)
                continue;
            char project[NAME_MAX + 1];
            size_t n = strcspn(name, "-");
            for (size_t i = 0; i < n; i++)
                project[i] = (char)((name[i] >= 'A' && name[i] <= 'Z') ? name[i] - 'A' + 'a' : name[i]);
            project[n] = '\0';
            for (int k = 0; k < NDEPS; k++) {
                if (strcmp(project, dependencies[k]) != 0 || found_count[k] > 0)
                    continue;
                char path[PATH_MAX];
                struct stat info;
                if (here_count[k] == MAX_ENTRIES ||
                    snprintf(path, sizeof path, "%s/%s", site_dirs[d], name) >= (int)sizeof path ||
                    stat(path, &info) < 0) {
                    failed = 1;  /* Python's OSError: this dir's findings are dropped */
                    break;
                }
                snprintf(here[k][here_count[k]++], NAME_MAX + 32, "%s:%lld", name, mtime_ns(&info));
            }
        }
        closedir(dir);
        if (failed)
            continue;
        for (int k = 0; k < NDEPS; k++) {
            if (here_count[k] == 0)
                continue;
            memcpy(found[k], here[k], sizeof here[k]);
            found_count[k] = here_count[k];
            nfound++;
        }
    }
    int rc = 0;
    for (int k = 0; k < NDEPS && rc == 0; k++) {
        char *entries[MAX_ENTRIES];
        for (int i = 0; i < found_count[k]; i++)
            entries[i] = found[k][i];
        qsort(entries, (size_t)found_count[k], sizeof *entries, by_name);
        rc = put(b, "", 1) | puts0(b, dependencies[k]) | put(b, "=", 1);
        if (found_count[k] == 0)
            rc |= put(b, "-", 1);
        for (int i = 0; i < found_count[k] && rc == 0; i++)
            rc = (i ? put(b, ",", 1) : 0) | puts0(b, entries[i]);
    }
    return rc;
}

/* forkserver.code_digest: names this interpreter, this copy of the code and its dependencies. */
static int code_digest(char out[9]) {
    struct buffer b = {0};
    int rc = puts0(&b, PYTHON_EXE) | put(&b, "", 1) | puts0(&b, PYTHON_VERSION) | put(&b, "", 1) |
             puts0(&b, PACKAGE_DIR);
    if (rc == 0)
        rc = put_modules(&b);
    if (rc == 0)
        rc = put_dependencies(&b);
    if (rc == 0)
        snprintf(out, 9, "%08lx", crc32(0L, (const Bytef *)b.data, (uInt)b.len));
    free(b.data);
    return rc;
}

/* forkserver._private_chain: only we and root can change what `path` and every directory above hold. */
static int private_chain(const char *resolved) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", resolved);
    uid_t uid = getuid();
    for (;;) {
        struct stat info;
        if (lstat(path, &info) < 0 || !S_ISDIR(info.st_mode) || (info.st_uid != uid && info.st_uid != 0))
            return 0;
        if ((info.st_mode & (S_IWGRP | S_IWOTH)) && !(info.st_mode & S_ISVTX))
            return 0;
        if (strcmp(path, "/") == 0)
            return 1;
        char *slash = strrchr(path, '/');
        if (slash == path)
            slash[1] = '\0';
        else
            *slash = '\0';
    }
}

/* forkserver.socket_path: <runtime_dir>/<version>-<digest>.sock, or -1 when there is none to use. */
static int socket_path(const char *digest, char *out, size_t size) {
    const char *base = getenv("XDG_RUNTIME_DIR");
    if (base == NULL || *base == '\0')
        base = getenv("TMPDIR");
    if (base == NULL || *base == '\0')
        base = "/tmp";
    char resolved[PATH_MAX];
    if (realpath(base, resolved) == NULL || !private_chain(resolved))
        return -1;
    char directory[PATH_MAX];
    if (snprintf(directory, sizeof directory, "%s/%s-%u", strcmp(resolved, "/") ? resolved : "", PLUGIN_NAME,
                 (unsigned)getuid()) >= (int)sizeof directory)
        return -1;
    if (mkdir(directory, 0700) < 0 && errno != EEXIST)
        return -1;
    struct stat info;
    if (lstat(directory, &info) < 0 || !S_ISDIR(info.st_mode) || info.st_uid != getuid() || (info.st_mode & 077))
        return -1;
    int len = snprintf(out, size, "%s/%s-%s.sock", directory, PACKAGE_VERSION, digest);
    return len < 0 || len > MAX_SOCKET_PATH || (size_t)len >= size ? -1 : 0;
}

/* ------------------------------------------------------------ route */

/* os.path.abspath: `path` joined to the cwd and normalized (posixpath.normpath). */
static int absolute_path(const char *path, const char *cwd, struct buffer *out) {
    struct buffer joined = {0};
    int rc = path[0] == '/' ? puts0(&joined, path)
                            : (puts0(&joined, cwd) | (ends_with(cwd, "/") ? 0 : put(&joined, "/", 1)) | puts0(&joined, path));
    rc |= put(&joined, "", 1);
    if (rc < 0) {
        free(joined.data);
        return -1;
    }
    /* normpath: two leading slashes stay two (POSIX leaves them implementation-defined), more become one */
    const char *p = joined.data;
    size_t initial = strspn(p, "/");
    initial = initial == 2 ? 2 : 1;
    size_t kept[PATH_MAX / 2];
    size_t nkept = 0;
    struct buffer parts = {0};
    for (char *save = NULL, *part = strtok_r(joined.data, "/", &save); part; part = strtok_r(NULL, "/", &save)) {
        if (strcmp(part, ".") == 0)
            continue;
        if (strcmp(part, "..") == 0) {
            if (nkept > 0)
                parts.len = kept[--nkept];
            continue;  /* above the root is the root */
        }
        if (nkept == sizeof kept / sizeof *kept) {
            rc = -1;
            break;
        }
        kept[nkept++] = parts.len;
        rc |= (parts.len ? put(&parts, "/", 1) : 0) | puts0(&parts, part);
    }
    rc |= put(out, "//", initial) | put(out, parts.data ? parts.data : "", parts.len);
    free(joined.data);
    free(parts.data);
    return rc;
}

/* cli.route + forkserver.route_of: the config file by absolute path and content, as a checksum. */
static int route(const char *config_path, const char *cwd, unsigned char out[16]) {
    struct buffer b = {0};
    int rc = absolute_path(config_path, cwd, &b) | put(&b, "", 1);
    FILE *file = rc == 0 ? fopen(b.data, "rb") : NULL;
    if (rc == 0 && file != NULL) {
        /* the path is in b up to its NUL: read the content after it */
        size_t path_len = b.len;
        if (grow(&b, ROUTE_CONTENT_LIMIT) == 0) {
            size_t got = fread(b.data + path_len, 1, ROUTE_CONTENT_LIMIT, file);
            b.len = ferror(file) ? path_len : path_len + got;  /* unreadable: no content, as OSError */
        } else {
            rc = -1;
        }
        fclose(file);
    }
    if (rc == 0) {
        uint32_t crc = (uint32_t)crc32(0L, (const Bytef *)b.data, (uInt)b.len);
        uint32_t adler = (uint32_t)adler32(1L, (const Bytef *)b.data, (uInt)b.len);
        uint64_t len = b.len;
        for (int i = 0; i < 4; i++) {
            out[i] = (unsigned char)(crc >> (24 - 8 * i));
            out[4 + i] = (unsigned char)(adler >> (24 - 8 * i));
        }
        for (int i = 0; i < 8; i++)
            out[8 + i] = (unsigned char)(len >> (56 - 8 * i));
    }
    free(b.data);
    return rc;
}

/* ------------------------------------------------------------ client */

static int send_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int recv_exact(int fd, unsigned char *data, size_t len) {
    while (len > 0) {
        ssize_t n = recv(fd, data, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int32_t be32(const unsigned char *p) {
    return (int32_t)((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]);
}

static void pack32(unsigned char *p, int32_t value) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)((uint32_t)value >> (24 - 8 * i));
}

/* forkserver._encode_request */
static int encode_request(struct buffer *b, const char *digest, const char *cwd, int argc, char **argv) {
    mode_t mask = umask(077);
    umask(mask);
    int rc = puts0(b, MAGIC) | put(b, "", 1) | puts0(b, digest) | put(b, "", 1) | puts0(b, cwd) | put(b, "", 1) |
             putf(b, "%u", (unsigned)mask) | put(b, "", 1) | putf(b, "%ld", (long)getpid()) | put(b, "", 1) |
             putf(b, "%ld", (long)getppid()) | put(b, "", 1) | putf(b, "%d", argc - 1);
    for (int i = 1; i < argc; i++)
        rc |= put(b, "", 1) | puts0(b, argv[i]);
    for (char **item = environ; *item; item++)
        rc |= put(b, "", 1) | puts0(b, *item);
    return rc;
}

static volatile sig_atomic_t g_first_signal;
static int g_conn = -1, g_alive_write = -1;

/* Forward a signal to the worker; the first one also goes into the liveness pipe, before it
 * (forkserver.act_on_caller_news). Only async-signal-safe calls here. */
static void on_signal(int signum) {
    int saved = errno;
    unsigned char byte = (unsigned char)signum;
    if (g_first_signal == 0) {
        g_first_signal = signum;
        (void)!write(g_alive_write, &byte, 1);
    }
    (void)!send(g_conn, &byte, 1, MSG_NOSIGNAL);
    errno = saved;
}

/* forkserver.exit_code_of: the worker's wait status as our own ending (its exit code, or its signal). */
static void __attribute__((noreturn)) die_like(int status) {
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL);
        kill(getpid(), sig);
        exit(128 + sig);  /* only for a signal whose default is not to terminate */
    }
    exit(WEXITSTATUS(status));
}

static int delegated(const char *command) {
    static const char *const commands[] = DELEGATED_COMMANDS;
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (strcmp(command, commands[i]) == 0)
            return 1;
    return 0;
}

/* cli.VERSION_COMMANDS, answered here: gpbackup and gprestore ask every host for them before each run,
 * and a Python start for a constant cost ~15 ms each (more with several at once). With more than one
 * argument, Python says what is wrong. */
static void answer_version(int argc, char **argv) {
    static const char *const answers[][2] = VERSION_COMMANDS;
    if (argc > 3)
        return;
    for (size_t i = 0; i < sizeof answers / sizeof *answers; i++) {
        if (strcmp(argv[1], answers[i][0]) != 0)
            continue;
        if (printf("%s\n", answers[i][1]) < 0 || fflush(stdout) != 0) {
            fprintf(stderr, "%s %s: cannot write to standard output: %s\n", PLUGIN_NAME, argv[1], strerror(errno));
            exit(1);
        }
        exit(0);
    }
}

#ifndef LAUNCHER_SELF_TEST
int main(int argc, char **argv) {
    g_argc = argc;
    g_argv = argv;
    if (argc > 1)
        answer_version(argc, argv);
    /* Only calls that carry a config are delegated (as in cli.main); anything else, even a wrong
     * argument count, is Python's to answer. */
    if (argc < 3 || !delegated(argv[1]))
        run_python(0);
    const char *command = argv[1];
    char path[PATH_MAX];
    char cwd[PATH_MAX];
    unsigned char route_bytes[16];
    char digest[9];
    if (getcwd(cwd, sizeof cwd) == NULL || code_digest(digest) < 0 || socket_path(digest, path, sizeof path) < 0 ||
        route(argv[2], cwd, route_bytes) < 0)
        run_python(0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    memcpy(address.sun_path, path, strlen(path) + 1);  /* socket_path kept it within MAX_SOCKET_PATH */
    int conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (conn < 0)
        run_python(0);
    struct timeval timeout = {.tv_sec = START_TIMEOUT_SECONDS};
    setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    struct ucred peer;
    socklen_t peer_len = sizeof peer;
    if (connect(conn, (struct sockaddr *)&address, sizeof address) < 0 ||
        getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) < 0 || peer.uid != getuid()) {
        close(conn);  /* not our server: it gets nothing of ours, not even the request */
        run_python(0);
    }
    /* Our server has the connection from here on: any trouble means it was asked. */
    struct buffer payload = {0};
    if (send_all(conn, route_bytes, sizeof route_bytes) < 0 || encode_request(&payload, digest, cwd, argc, argv) < 0) {
        close(conn);
        run_python(1);
    }
    int alive[2];
    if (pipe2(alive, O_CLOEXEC) < 0) {
        close(conn);
        run_python(1);
    }
    /* The payload's length, with our stdin/stdout/stderr and the liveness pipe's read end. */
    unsigned char length[4];
    pack32(length, (int32_t)payload.len);
    int fds[4] = {0, 1, 2, alive[0]};
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = length, .iov_len = sizeof length};
    struct msghdr message = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                             .msg_controllen = sizeof control.buf};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t sent;
    do
        sent = sendmsg(conn, &message, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    close(alive[0]);
    unsigned char reply[5];
    struct timeval none = {0};
    int replied = sent == (ssize_t)sizeof length && send_all(conn, payload.data, payload.len) == 0 &&
                  recv_exact(conn, reply, sizeof reply) == 0;
    while (replied && reply[0] == (unsigned char)QUEUED) {
        /* The server keeps the call until a worker of its route is free: however long that takes. */
        setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
        replied = recv_exact(conn, reply, sizeof reply) == 0;
    }
    if (!replied || reply[0] != (unsigned char)STARTED) {
        close(conn);  /* refused or gone before the worker started: nothing ran */
        close(alive[1]);
        run_python(1);
    }
    free(payload.data);
    /* From here on the command is running: whatever happens, it is never run twice. */
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
    g_conn = conn;
    g_alive_write = alive[1];
    /* As in Python: a write to a worker or pipe that is gone is EPIPE, never the end of us. */
    signal(SIGPIPE, SIG_IGN);
    static const int forwarded[] = FORWARDED_SIGNALS;
    struct sigaction previous[sizeof forwarded / sizeof *forwarded];
    int caught[sizeof forwarded / sizeof *forwarded] = {0};
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) {
        struct sigaction current;
        /* a signal ignored here stays ignored, as it would be by the plugin running here */
        if (sigaction(forwarded[i], NULL, &current) == 0 && current.sa_handler != SIG_IGN) {
            struct sigaction action = {.sa_handler = on_signal};
            sigemptyset(&action.sa_mask);
            caught[i] = sigaction(forwarded[i], &action, &previous[i]) == 0;
        }
    }
    int ended = recv_exact(conn, reply, sizeof reply) == 0 && reply[0] == (unsigned char)ENDED;
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        if (caught[i])
            sigaction(forwarded[i], &previous[i], NULL);
    int status = ended ? be32(reply + 1) : 0;
    if (g_first_signal != 0 && (!ended || (WIFEXITED(status) && WEXITSTATUS(status) == 0))) {
        /* Our signal ended the worker (which then says nothing more), or the worker finished before the
         * signal reached it. Run here, the call would have been ended by it, so it is: a signalled call
         * never reports success. */
        if (g_first_signal == SIGINT) {
            fprintf(stderr, "%s %s: %s\n", PLUGIN_NAME, command, INTERRUPTED_MESSAGE);
            return INTERRUPTED_EXIT_CODE;
        }
        signal(g_first_signal, SIG_DFL);
        raise(g_first_signal);
    }
    if (!ended) {
        fprintf(stderr, "%s %s: %s\n", PLUGIN_NAME, command, WORKER_LOST_MESSAGE);
        return WORKER_LOST_EXIT_CODE;
    }
    die_like(status);
}
#else
/* What build.py compares with the Python code before it installs the client: the code digest, then
 * each argument's route (as a config path), in hex; a difference means the client would never be served. */
int main(int argc, char **argv) {
    char digest[9], cwd[PATH_MAX];
    if (code_digest(digest) < 0 || getcwd(cwd, sizeof cwd) == NULL)
        return 1;
    printf("%s\n", digest);
    for (int i = 1; i < argc; i++) {
        unsigned char bytes[16];
        if (route(argv[i], cwd, bytes) < 0)
            return 1;
        for (int k = 0; k < 16; k++)
            printf("%02x", bytes[k]);
        printf("\n");
    }
    return 0;
}
#endif
