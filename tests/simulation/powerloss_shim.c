/* Power-loss shim for tests/test_power_loss.py (LD_PRELOAD; test-only, never shipped).
 *
 * Model: after a power cut, each file holds exactly what it held at its last successful
 * fsync/fdatasync, and the directory listing is what it was at the last fsync of the directory.
 * The shim keeps that state in a shadow directory: after the real fsync/fdatasync of a regular file
 * inside the watched directory succeeds, it copies the whole file (what the kernel just made
 * durable) to SHADOW/<basename> (and its inode to SHADOW/.ino.<basename>); after an fsync of the
 * watched directory itself it makes the shadow's set of names equal to the directory's: a new name
 * for an inode already shadowed (link, rename) gets that durable content, any other new name appears
 * empty (the entry is durable, its data is not), removed names disappear. Everything else is
 * passed through untouched.
 * Shadow updates are written to a temp file and renamed, so a SIGKILL mid-copy leaves the
 * previous synced state: the same as a cut just before that fsync completed.
 *
 * Environment (re-read whenever the pid changes, so a forked child gets its own counter):
 *   POSGUARD_SHADOW_DIR    where the shadow copies live (required; without it the shim is inert)
 *   POSGUARD_SHADOW_WATCH  the directory whose files are modelled (absolute, no trailing slash)
 *   POSGUARD_SHADOW_LOG    optional: one line per intercepted sync ("fsync <path>")
 *   POSGUARD_KILL_AT_SYNC  optional N >= 1: SIGKILL the process at the Nth sync of a watched path
 *   POSGUARD_KILL_WHEN     "before" (default: nothing of that sync is durable) or "after"
 *                          (durable and shadowed, but the caller never sees it return)
 *
 * Any failure to maintain the shadow aborts the process loudly (exit 97): a silent shim would
 * make the test pass for the wrong reason.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

typedef int (*sync_fn)(int);
typedef int (*sfr_fn)(int, off64_t, off64_t, unsigned int);

static pid_t cfg_pid = -1;
static const char *shadow_dir, *watch_dir, *log_path;
static long kill_at, sync_count;
static int kill_after;

static void die(const char *what, const char *path) {
    char msg[PATH_MAX + 128];
    int n = snprintf(msg, sizeof msg, "powerloss_shim: %s %s: %s\n", what, path ? path : "", strerror(errno));
    if (n > 0) (void)!write(2, msg, (size_t)n);
    _exit(97);
}

static void load_config(void) {
    pid_t me = getpid();
    if (me == cfg_pid) return;
    cfg_pid = me;
    sync_count = 0;
    shadow_dir = getenv("POSGUARD_SHADOW_DIR");
    watch_dir = getenv("POSGUARD_SHADOW_WATCH");
    log_path = getenv("POSGUARD_SHADOW_LOG");
    const char *k = getenv("POSGUARD_KILL_AT_SYNC");
    kill_at = k ? strtol(k, NULL, 10) : 0;
    const char *w = getenv("POSGUARD_KILL_WHEN");
    kill_after = w && strcmp(w, "after") == 0;
}

/* 1: regular file directly inside the watch dir, 2: the watch dir itself, 0: not ours. */
static int classify(int fd, char *path, size_t cap, struct stat *st) {
    if (!shadow_dir || !watch_dir || fstat(fd, st) != 0) return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, cap - 1);
    if (n <= 0) return 0;
    path[n] = '\0';
    size_t wl = strlen(watch_dir);
    if (S_ISDIR(st->st_mode)) return strcmp(path, watch_dir) == 0 ? 2 : 0;
    if (!S_ISREG(st->st_mode) || strncmp(path, watch_dir, wl) != 0 || path[wl] != '/') return 0;
    if (strchr(path + wl + 1, '/') || strstr(path, " (deleted)")) return 0;
    return 1;
}

static void write_ino(const char *name, ino_t ino) {
    char p[PATH_MAX], tmp[PATH_MAX], text[32];
    snprintf(p, sizeof p, "%s/.ino.%s", shadow_dir, name);
    snprintf(tmp, sizeof tmp, "%s/.tmp.ino.%s.%d", shadow_dir, name, (int)getpid());
    int n = snprintf(text, sizeof text, "%llu\n", (unsigned long long)ino);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, text, (size_t)n) != n || close(fd) != 0) die("write", tmp);
    if (rename(tmp, p) != 0) die("rename", p);
}

static ino_t read_ino(const char *name) {
    char p[PATH_MAX], text[32] = {0};
    snprintf(p, sizeof p, "%s/.ino.%s", shadow_dir, name);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    return n > 0 ? (ino_t)strtoull(text, NULL, 10) : 0;
}

/* SHADOW/<name> := everything readable from src_fd (empty if src_fd < 0); remembers the inode,
 * because durable data belongs to the inode: a name linked or renamed to it later shares it. */
static void put_shadow(const char *name, int src_fd, ino_t ino) {
    char tmp[PATH_MAX], dst[PATH_MAX];
    snprintf(dst, sizeof dst, "%s/%s", shadow_dir, name);
    snprintf(tmp, sizeof tmp, "%s/.tmp.%s.%d", shadow_dir, name, (int)getpid());
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) die("open", tmp);
    if (src_fd >= 0) {
        static char buf[1 << 16];
        off_t off = 0;
        for (;;) {
            ssize_t r = pread(src_fd, buf, sizeof buf, off);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) die("pread", name);
            if (r == 0) break;
            for (ssize_t done = 0; done < r;) {
                ssize_t w = write(out, buf + done, (size_t)(r - done));
                if (w < 0 && errno == EINTR) continue;
                if (w < 0) die("write", tmp);
                done += w;
            }
            off += r;
        }
    }
    if (close(out) != 0) die("close", tmp);
    write_ino(name, ino);
    if (rename(tmp, dst) != 0) die("rename", dst);
}

static void shadow_file(const char *path, ino_t ino) {
    /* Re-open through the path: SQLite may hold the fd write-only in other builds. */
    int in = open(path, O_RDONLY | O_CLOEXEC);
    if (in < 0) die("reopen", path);
    put_shadow(strrchr(path, '/') + 1, in, ino);
    close(in);
}

static int exists_in(const char *dir, const char *name) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    struct stat st;
    return lstat(p, &st) == 0;
}

/* The shadow name whose recorded inode is ``ino`` (and which is not ``except``), or NULL. */
static int shadow_name_for_ino(ino_t ino, const char *except, char *out, size_t cap) {
    DIR *d = opendir(shadow_dir);
    if (!d) die("opendir", shadow_dir);
    struct dirent *e;
    int found = 0;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, except) == 0) continue;
        if (read_ino(e->d_name) == ino) {
            snprintf(out, cap, "%s", e->d_name);
            found = 1;
        }
    }
    closedir(d);
    return found;
}

static void shadow_dir_listing(void) {
    DIR *d = opendir(watch_dir);
    if (!d) die("opendir", watch_dir);
    struct dirent *e;
    while ((e = readdir(d))) {  /* names that were only in the page cache become durable */
        if (e->d_name[0] == '.' || e->d_type == DT_DIR) continue;
        char p[PATH_MAX], other[NAME_MAX + 1];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", watch_dir, e->d_name);
        if (lstat(p, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        if (exists_in(shadow_dir, e->d_name) && read_ino(e->d_name) == st.st_ino) continue;
        if (shadow_name_for_ino(st.st_ino, e->d_name, other, sizeof other)) {
            /* link()/rename() of an inode whose data is already durable under another name */
            char src[PATH_MAX];
            snprintf(src, sizeof src, "%s/%s", shadow_dir, other);
            int in = open(src, O_RDONLY | O_CLOEXEC);
            if (in < 0) die("open", src);
            put_shadow(e->d_name, in, st.st_ino);
            close(in);
        } else {
            put_shadow(e->d_name, -1, st.st_ino);  /* the entry is durable, none of its data is */
        }
    }
    closedir(d);
    d = opendir(shadow_dir);
    if (!d) die("opendir", shadow_dir);
    while ((e = readdir(d))) {  /* unlinks made durable */
        if (e->d_name[0] == '.' || exists_in(watch_dir, e->d_name)) continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", shadow_dir, e->d_name);
        if (unlink(p) != 0) die("unlink", p);
        snprintf(p, sizeof p, "%s/.ino.%s", shadow_dir, e->d_name);
        unlink(p);
    }
    closedir(d);
}

static void log_call(const char *fn, const char *path) {
    if (!log_path) return;
    char line[PATH_MAX + 64];
    int n = snprintf(line, sizeof line, "%s %s\n", fn, path);
    int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) die("open", log_path);
    if (n > 0) (void)!write(fd, line, (size_t)n);
    close(fd);
}

static int wrap(const char *fn, int fd, sync_fn real) {
    load_config();
    char path[PATH_MAX];
    struct stat st;
    int kind = classify(fd, path, sizeof path, &st);
    if (!kind) return real(fd);
    log_call(fn, path);
    int hit = kill_at > 0 && ++sync_count == kill_at;
    if (hit && !kill_after) kill(getpid(), SIGKILL);
    int rc = real(fd);
    if (rc == 0) {
        int saved = errno;
        if (kind == 1) shadow_file(path, st.st_ino); else shadow_dir_listing();
        errno = saved;
    }
    if (hit) kill(getpid(), SIGKILL);
    return rc;
}

static sync_fn real_fsync, real_fdatasync;
static sfr_fn real_sfr;

int fsync(int fd) {
    if (!real_fsync) real_fsync = (sync_fn)dlsym(RTLD_NEXT, "fsync");
    return wrap("fsync", fd, real_fsync);
}

int fdatasync(int fd) {
    if (!real_fdatasync) real_fdatasync = (sync_fn)dlsym(RTLD_NEXT, "fdatasync");
    return wrap("fdatasync", fd, real_fdatasync);
}

/* Not a durability barrier for metadata; SQLite does not call it. Logged so the test can prove
 * nobody relies on it (a caller that did would see no shadow update). */
int sync_file_range(int fd, off64_t off, off64_t n, unsigned int flags) {
    if (!real_sfr) real_sfr = (sfr_fn)dlsym(RTLD_NEXT, "sync_file_range");
    load_config();
    char path[PATH_MAX];
    struct stat st;
    if (classify(fd, path, sizeof path, &st)) log_call("sync_file_range", path);
    return real_sfr(fd, off, n, flags);
}
