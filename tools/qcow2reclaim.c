/* SPDX-License-Identifier: BSD-3-Clause */
/* qcow2reclaim: info, map, check and compact on the engine the nbdkit
 * plugin uses.  The image is opened read-only, with the shared locks
 * qemu-img takes (none with -U), except by compact and check -r, which
 * take the writer's locks.
 */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tool.h"

static const char usage[] =
  "usage: qcow2reclaim info [-U] [--summary] [--output=human|json] IMAGE...\n"
  "       qcow2reclaim map [-U] [--output=human|json] IMAGE\n"
  "       qcow2reclaim check [-U | -r leaks|all] [--output=human|json] IMAGE\n"
  "       qcow2reclaim compact [--dry-run [-U]] [--passphrase-file=FILE] [--output=human|json] IMAGE\n"
  "       qcow2reclaim --help | --version\n"
  "\n"
  "info     what qemu-img info shows, then the space each snapshot holds alone,\n"
  "         the space reclaimable and the length compaction could reach; with\n"
  "         --summary, one line for each image\n"
  "map      where each guest range lives (as qemu-img map)\n"
  "check    rebuild refcounts from every table and compare; exit 0 clean,\n"
  "         1 check failed, 2 corruptions, 3 leaks only (as qemu-img check);\n"
  "         -r leaks frees leaked clusters, -r all also raises counts that are\n"
  "         too low and mends COPIED flags (the image must not be in use)\n"
  "compact  move the clusters at the end of the file into free ones below and cut\n"
  "         the file, in place (the image must not be in use); --dry-run says the\n"
  "         length it would reach and what keeps it longer; exit 0 done, 1 failed,\n"
  "         2 done but clusters that cannot move keep it past the bound\n"
  "\n"
  "-U, --force-share  read an image another program has open for writing,\n"
  "         without its lock (as qemu-img -U); what is shown may be stale\n"
  "--passphrase-file=FILE  the passphrase of a LUKS-encrypted image, which\n"
  "         compact needs to re-encrypt the clusters it moves (info, map and\n"
  "         check read only metadata, and need none)\n";

struct tool_options opt;

/* Progress on a terminal only, so scripts and logs stay clean. */
static void progress (void *opaque, uint64_t done, uint64_t total)
{
  static int last = -1;
  int pct = total ? (int) (done * 100 / total) : 100;

  if (pct != last) {
    fprintf (stderr, "\r    (%d.00/100%%)", pct);
    last = pct;
  }
}

/* The file whole, without one final newline (as nbdkit reads +FILE). */
static int read_passphrase (const char *path, char *buf, size_t size, size_t *len)
{
  FILE *f = fopen (path, "re");
  size_t n;

  if (!f) {
    fprintf (stderr, "qcow2reclaim: --passphrase-file=%s: %s\n", path, strerror (errno));
    return -1;
  }
  n = fread (buf, 1, size, f);
  fclose (f);
  if (n == size) {
    explicit_bzero (buf, size);
    fprintf (stderr, "qcow2reclaim: --passphrase-file=%s: longer than %zu bytes\n", path,
             size - 1);
    return -1;
  }
  if (n && buf[n - 1] == '\n')
    n--;
  *len = n;
  return 0;
}

/* Encrypted images open for their metadata without a passphrase. */
int tool_open (const char *file, bool writable, struct q2_image **img)
{
  struct q2_options o = { .file = file, .readonly = !writable, .force_share = opt.force_share,
                          .repair = writable && opt.repair, .compact = Q2_COMPACT_OFF,
                          .metadata_only = true };
  char pass[1024];
  int r;

  if (opt.passphrase_file) {
    if (read_passphrase (opt.passphrase_file, pass, sizeof pass, &o.passphrase_len) < 0)
      return -EINVAL;
    o.passphrase = pass;
  }
  r = q2_open (&o, img);
  explicit_bzero (pass, sizeof pass);

  /* -EAGAIN: the lock, whose message the engine has given. */
  if (r == -EAGAIN && !writable)
    fprintf (stderr, "qcow2reclaim: %s: to read it anyway, without the lock, use -U "
             "(--force-share); what it shows may then be stale\n", file);
  if (r == 0 && opt.force_share)
    fprintf (stderr, "qcow2reclaim: %s: read without the image lock (-U): if another "
             "program is writing it, these figures may be stale\n", file);
  return r;
}

static double mib (uint64_t bytes)
{
  return bytes / 1048576.0;
}

/* "moved 12.0 of 80.0 MiB (15%)" on a terminal, rewritten in place. */
static void compact_progress (void *opaque, uint64_t done, uint64_t total)
{
  static int last = -1;
  int pct = total ? (int) (done * 100 / total) : 100;

  if (pct != last) {
    fprintf (stderr, "\r    moved %.1f of %.1f MiB (%d%%)", mib (done), mib (total), pct);
    last = pct;
  }
}

static int cmd_compact (struct q2_image *img)
{
  struct q2_compact_result c;
  bool tty = isatty (2) && !opt.dry_run;
  uint64_t pinned;
  int r = q2_compact (img, opt.dry_run, tty ? compact_progress : NULL, NULL, &c);

  if (tty)
    fprintf (stderr, "\r%50s\r", "");
  if (r < 0) {
    fprintf (stderr, "qcow2reclaim: %s: compaction failed: %s\n", q2_file_name (img),
             strerror (-r));
    return 1;
  }
  pinned = c.pinned_compressed + c.pinned_shared + c.pinned_snapshot + c.pinned_unreferenced +
    c.pinned_bitmaps;
  if (opt.json) {
    printf ("{\n  \"filename\": ");
    json_string (q2_file_name (img));
    printf (",\n  \"dry-run\": %s,\n"
            "  \"length-before\": %" PRIu64 ",\n  \"length-after\": %" PRIu64 ",\n"
            "  \"reachable-length\": %" PRIu64 ",\n  \"used\": %" PRIu64 ",\n"
            "  \"bound\": %" PRIu64 ",\n  \"target\": %" PRIu64 ",\n"
            "  \"clusters-moved\": %" PRIu64 ",\n  \"bytes-moved\": %" PRIu64 ",\n"
            "  \"free-bytes-punched\": %" PRIu64 ",\n"
            "  \"pinned\": { \"compressed\": %" PRIu64 ", \"shared\": %" PRIu64
            ", \"snapshot\": %" PRIu64 ", \"unreferenced\": %" PRIu64
            ", \"bitmaps\": %" PRIu64 " }\n}\n",
            opt.dry_run ? "true" : "false", c.length_before,
            c.length_after, c.reachable, c.used, c.bound, c.target, c.clusters_moved,
            c.bytes_moved, c.free_bytes_punched, c.pinned_compressed, c.pinned_shared,
            c.pinned_snapshot, c.pinned_unreferenced, c.pinned_bitmaps);
  }
  else {
    printf ("image: %s\n", q2_file_name (img));
    if (opt.dry_run)
      printf ("length: %.1f MiB now, %.1f MiB reachable (data %.1f MiB, target %.1f MiB)\n"
              "free space the host still holds: %.1f MiB\n",
              mib (c.length_before), mib (c.reachable), mib (c.used), mib (c.target),
              mib (c.free_bytes_punched));
    else
      printf ("length: %.1f MiB -> %.1f MiB (data %.1f MiB, target %.1f MiB)\n"
              "moved: %" PRIu64 " clusters, %.1f MiB\n"
              "free space given back to the host: %.1f MiB\n",
              mib (c.length_before), mib (c.length_after), mib (c.used), mib (c.target),
              c.clusters_moved, mib (c.bytes_moved), mib (c.free_bytes_punched));
    if (pinned)
      printf ("cannot move, past the target: %.1f MiB (compressed %.1f, shared with "
              "snapshots %.1f, snapshots' own %.1f, referenced by nothing %.1f, "
              "persistent bitmaps %.1f)\n",
              mib (pinned), mib (c.pinned_compressed), mib (c.pinned_shared),
              mib (c.pinned_snapshot), mib (c.pinned_unreferenced), mib (c.pinned_bitmaps));
  }
  return (opt.dry_run ? c.reachable : c.length_after) > c.bound ? 2 : 0;
}

int tool_check (struct q2_image *img, struct q2_check *res)
{
  bool tty = isatty (2);
  int r = q2_check (img, res, tty ? progress : NULL, NULL);

  if (tty)
    fprintf (stderr, "\r                    \r");
  if (r < 0)
    fprintf (stderr, "qcow2reclaim: %s: the check could not complete: %s\n",
             q2_file_name (img), strerror (-r));
  return r;
}

static int print_map (void *opaque, const struct q2_map_entry *e)
{
  bool *first = opaque;

  if (opt.json) {
    printf ("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d, "
            "\"present\": %s, \"zero\": %s, \"data\": %s",
            *first ? "[" : ",\n", e->start, e->length, e->depth,
            e->present ? "true" : "false", e->zero ? "true" : "false",
            e->data ? "true" : "false");
    if (e->has_offset)
      printf (", \"offset\": %" PRIu64, e->offset);
    printf ("}");
  }
  else if (e->data && e->has_offset)
    printf ("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n",
            e->start, e->length, e->offset, e->file);
  *first = false;
  return 0;
}

static int cmd_map (struct q2_image *img)
{
  bool first = true;
  int r;

  if (!opt.json)
    printf ("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  r = q2_map (img, print_map, &first);
  if (opt.json)
    printf ("%s]\n", first ? "[" : "");
  return r < 0 ? 1 : 0;
}

static void print_check (struct q2_image *img, const struct q2_check *c,
                         const struct q2_repair_result *fixed)
{
  if (opt.json) {
    printf ("{\n  \"filename\": ");
    json_string (q2_file_name (img));
    printf (",\n  \"check-errors\": 0,\n  \"corruptions\": %" PRIu64 ",\n  \"leaks\": %"
            PRIu64 ",\n", c->corruptions, c->leaks);
    if (fixed)
      printf ("  \"leaks-fixed\": %" PRIu64 ",\n  \"corruptions-fixed\": %" PRIu64 ",\n",
              fixed->leaks_fixed, fixed->corruptions_fixed);
    printf ("  \"allocated-clusters\": %" PRIu64 ",\n  \"total-clusters\": %" PRIu64
            ",\n  \"image-end-offset\": %" PRIu64 "\n}\n", c->allocated_clusters,
            c->total_clusters, c->image_end_offset);
    return;
  }
  if (fixed && (fixed->leaks_fixed || fixed->corruptions_fixed))
    printf ("The following inconsistencies were found and repaired:\n\n"
            "    %" PRIu64 " leaked clusters\n    %" PRIu64 " corruptions\n\n"
            "Double checking the fixed image now...\n",
            fixed->leaks_fixed, fixed->corruptions_fixed);
  if (!c->corruptions && !c->leaks)
    printf ("No errors were found on the image.\n");
  if (c->corruptions)
    printf ("\n%" PRIu64 " errors were found on the image.\n"
            "Data may be corrupted, or further writes to the image may corrupt it.\n",
            c->corruptions);
  if (c->leaks)
    printf ("\n%" PRIu64 " leaked clusters were found on the image.\n"
            "This means waste of disk space, but no harm to data.\n", c->leaks);
  printf ("%" PRIu64 "/%" PRIu64 " = %.2f%% allocated, %.2f%% fragmented, "
          "%.2f%% compressed clusters\nImage end offset: %" PRIu64 "\n",
          c->allocated_clusters, c->total_clusters,
          percent (c->allocated_clusters, c->total_clusters),
          percent (c->fragmented_clusters, c->allocated_clusters),
          percent (c->compressed_clusters, c->allocated_clusters), c->image_end_offset);
}

static int exit_status (const struct q2_check *c)
{
  return c->corruptions ? 2 : c->leaks ? 3 : 0;
}

/* check -r: the repair, then what the check of the repaired image says. */
static int cmd_repair (struct q2_image *img)
{
  struct q2_repair_result res;
  bool tty = isatty (2);
  int r = q2_repair (img, opt.repair, &res, tty ? progress : NULL, NULL);

  if (tty)
    fprintf (stderr, "\r                    \r");
  if (r < 0) {
    if (r != -EINVAL)
      fprintf (stderr, "qcow2reclaim: %s: the repair could not complete: %s\n",
               q2_file_name (img), strerror (-r));
    return 1;
  }
  print_check (img, &res.after, &res);
  r = exit_status (&res.after);
  q2_check_free (&res.after);
  return r;
}

static int cmd_check (struct q2_image *img)
{
  struct q2_check c;

  if (opt.repair)
    return cmd_repair (img);
  if (tool_check (img, &c) < 0)
    return 1;
  q2_check_free (&c);
  print_check (img, &c, NULL);
  return exit_status (&c);
}

int main (int argc, char **argv)
{
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },   /* 0.1's spelling of --output=json */
    { "dry-run", no_argument, NULL, 'n' },
    { "output", required_argument, NULL, 'o' },
    { "force-share", no_argument, NULL, 'U' },
    { "summary", no_argument, NULL, 's' },
    { "repair", required_argument, NULL, 'r' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { "passphrase-file", required_argument, NULL, 'P' },
    { NULL, 0, NULL, 0 },
  };
  struct q2_image *img;
  bool summary = false;
  const char *cmd;
  int c, r;

  while ((c = getopt_long (argc, argv, "ho:Ur:", opts, NULL)) != -1) {
    switch (c) {
    case 'j': opt.json = true; break;
    case 'n': opt.dry_run = true; break;
    case 'U': opt.force_share = true; break;
    case 's': summary = true; break;
    case 'P': opt.passphrase_file = optarg; break;
    case 'r':
      if (strcmp (optarg, "leaks") == 0)
        opt.repair = Q2_REPAIR_LEAKS;
      else if (strcmp (optarg, "all") == 0)
        opt.repair = Q2_REPAIR_ALL;
      else {
        fprintf (stderr, "qcow2reclaim: -r %s: expected leaks or all\n", optarg);
        return 1;
      }
      break;
    case 'o':
      if (strcmp (optarg, "json") == 0)
        opt.json = true;
      else if (strcmp (optarg, "human") != 0) {
        fprintf (stderr, "qcow2reclaim: --output=%s: expected human or json\n", optarg);
        return 1;
      }
      break;
    case 'h': fputs (usage, stdout); return 0;
    case 'V': printf ("qcow2reclaim %s\n", PACKAGE_VERSION); return 0;
    default: fputs (usage, stderr); return 1;
    }
  }
  if (argc - optind < 2) {
    fputs (usage, stderr);
    return 1;
  }
  cmd = argv[optind];
  if (strcmp (cmd, "info") && strcmp (cmd, "map") && strcmp (cmd, "check") &&
      strcmp (cmd, "compact")) {
    fprintf (stderr, "qcow2reclaim: unknown command '%s'\n%s", cmd, usage);
    return 1;
  }
  if (summary && strcmp (cmd, "info")) {
    fprintf (stderr, "qcow2reclaim: --summary goes with info only\n");
    return 1;
  }
  if (opt.repair && strcmp (cmd, "check")) {
    fprintf (stderr, "qcow2reclaim: -r goes with check only\n");
    return 1;
  }
  if (opt.repair && opt.force_share) {
    fprintf (stderr, "qcow2reclaim: -U (--force-share) reads only: a repair needs the "
             "image to itself\n");
    return 1;
  }
  if (opt.dry_run && strcmp (cmd, "compact")) {
    fprintf (stderr, "qcow2reclaim: --dry-run goes with compact only\n");
    return 1;
  }
  if (opt.passphrase_file && strcmp (cmd, "compact")) {
    fprintf (stderr, "qcow2reclaim: --passphrase-file goes with compact only (info, map "
             "and check need no passphrase)\n");
    return 1;
  }
  if (opt.force_share && strcmp (cmd, "compact") == 0 && !opt.dry_run) {
    fprintf (stderr, "qcow2reclaim: -U (--force-share) reads only: compact changes the "
             "image, and needs it to itself (use --dry-run to only plan)\n");
    return 1;
  }
  if (strcmp (cmd, "info") == 0)
    return cmd_info (argc - optind - 1, argv + optind + 1, summary);
  if (argc - optind != 2) {
    fputs (usage, stderr);
    return 1;
  }
  if (tool_open (argv[optind + 1],
                 (strcmp (cmd, "compact") == 0 && !opt.dry_run) || opt.repair, &img) < 0)
    return 1;
  r = strcmp (cmd, "map") == 0 ? cmd_map (img)
    : strcmp (cmd, "compact") == 0 ? cmd_compact (img) : cmd_check (img);
  q2_close (img);
  return r;
}
