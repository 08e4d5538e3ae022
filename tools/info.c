/* SPDX-License-Identifier: BSD-3-Clause */
/* qcow2reclaim info: first what qemu-img info shows, in its words, then
 * what reclaiming space needs besides: the space snapshots hold, what the
 * host could get back, and the length compaction could reach.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "tool.h"

struct facts {
  struct q2_image *img;
  struct q2_header_info h;
  struct q2_check c;
  struct q2_compact_result k;
  struct q2_snapshot *snaps;
  uint32_t nsnaps;
  struct q2_bitmap *bitmaps;
  uint32_t nbitmaps;
  uint64_t file_size;
  uint64_t host;              /* bytes the host file takes on disk */
  uint64_t compactable;       /* the length compaction could reach */
  uint64_t pinned;            /* past the target, and unable to move */
};

/* The engine's last error, for the summary line of an image that failed
 * (it is on stderr too).
 */
static char last_error[1024];
/* What the check finds, cluster by cluster, is check's to say: info
 * gives the totals.
 */
static bool checking;

static void logger (int level, const char *msg)
{
  if (level > 1)
    return;
  if (level == 0)
    snprintf (last_error, sizeof last_error, "%s", msg);
  if (!checking)
    fprintf (stderr, "qcow2reclaim: %s\n", msg);
}

static const char *open_failure (int err)
{
  return err == -EAGAIN ? "in-use"
    : err == -EINVAL || err == -ENOTSUP || err == -ELOOP ? "refused" : "failed";
}

static void release (struct facts *f)
{
  q2_check_free (&f->c);
  q2_snapshots_free (f->snaps, f->nsnaps);
  q2_bitmaps_free (f->bitmaps, f->nbitmaps);
}

static int gather (struct q2_image *img, struct facts *f)
{
  const char *name = q2_file_name (img);
  struct stat st;
  int r;

  memset (f, 0, sizeof *f);
  f->img = img;
  q2_header_info (img, &f->h);
  checking = true;
  r = tool_check (img, &f->c);
  checking = false;
  if (r < 0)
    return -1;
  if ((r = q2_file_size (img, &f->file_size)) < 0 || stat (name, &st) < 0) {
    fprintf (stderr, "qcow2reclaim: %s: cannot get the file's size: %s\n", name,
             strerror (r < 0 ? -r : errno));
    return -1;
  }
  f->host = (uint64_t) st.st_blocks * 512;
  f->nsnaps = q2_snapshot_count (img);
  if ((r = q2_snapshots (img, &f->snaps)) < 0) {
    fprintf (stderr, "qcow2reclaim: %s: cannot read the snapshot table: %s\n", name,
             strerror (-r));
    return -1;
  }
  if ((r = q2_bitmaps (img, &f->bitmaps, &f->nbitmaps)) < 0) {
    fprintf (stderr, "qcow2reclaim: %s: cannot list the persistent bitmaps: %s\n", name,
             strerror (-r));
    return -1;
  }
  /* What compaction could reach, and what stays: a plan, nothing moved. */
  if ((r = q2_compact (img, true, NULL, NULL, &f->k)) < 0) {
    fprintf (stderr, "qcow2reclaim: %s: cannot plan compaction: %s\n", name, strerror (-r));
    return -1;
  }
  f->compactable = f->k.reachable < f->file_size ? f->k.reachable : f->file_size;
  f->pinned = f->k.pinned_compressed + f->k.pinned_shared + f->k.pinned_snapshot +
    f->k.pinned_unreferenced + f->k.pinned_bitmaps;
  return 0;
}

static const char *yes_no (bool b)
{
  return b ? "true" : "false";
}

/* "12 MiB (12582912 bytes)" */
static void print_size_bytes (const char *label, uint64_t bytes)
{
  char h[HUMAN_SIZE_LEN];

  printf ("%s%s (%" PRIu64 " bytes)\n", label, human_size (bytes, h), bytes);
}

static void print_snapshot_row (const struct q2_snapshot *s)
{
  char size[HUMAN_SIZE_LEN], date[32] = "", clock[48], icount[24] = "";
  time_t t = s->date_sec;
  struct tm tm;
  uint64_t secs = s->vm_clock_nsec / 1000000000;

  if (localtime_r (&t, &tm))
    strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
  snprintf (clock, sizeof clock, "%02" PRIu64 ":%02u:%02u.%03u", secs / 3600,
            (unsigned) (secs / 60 % 60), (unsigned) (secs % 60),
            (unsigned) (s->vm_clock_nsec / 1000000 % 1000));
  if (s->has_icount)
    snprintf (icount, sizeof icount, "%" PRIu64, s->icount);
  printf ("%-9s %-16s %8s%20s%13s%11s\n", s->id, s->name, human_size (s->vm_state_size, size),
          date, clock, icount);
}

/* As qemu-img info lists them, inside the format specific information. */
static void print_bitmaps (const struct facts *f)
{
  uint32_t i, n;

  if (!f->nbitmaps)
    return;
  printf ("    bitmaps:\n");
  for (i = 0; i < f->nbitmaps; i++) {
    const struct q2_bitmap *b = &f->bitmaps[i];
    printf ("        [%u]:\n            flags:\n", i);
    n = 0;
    if (b->in_use)
      printf ("                [%u]: in-use\n", n++);
    if (b->auto_flag)
      printf ("                [%u]: auto\n", n++);
    printf ("            name: %s\n            granularity: %" PRIu64 "\n", b->name,
            b->granularity);
  }
}

/* The lines qemu-img info prints, as it prints them. */
static void print_qemu_part (const struct facts *f)
{
  const struct q2_header_info *h = &f->h;
  char buf[HUMAN_SIZE_LEN];
  uint32_t i;

  printf ("image: %s\nfile format: qcow2\n", q2_file_name (f->img));
  print_size_bytes ("virtual size: ", q2_virtual_size (f->img));
  printf ("disk size: %s\n", human_size (f->host, buf));
  if (h->encryption)
    printf ("encrypted: yes\n");
  printf ("cluster_size: %u\n", q2_cluster_size (f->img));
  if (h->dirty)
    printf ("cleanly shut down: no\n");
  if (h->backing_file) {
    printf ("backing file: %s", h->backing_file);
    if (h->backing_path && strcmp (h->backing_path, h->backing_file))
      printf (" (actual path: %s)", h->backing_path);
    printf ("\n");
  }
  if (h->backing_format)
    printf ("backing file format: %s\n", h->backing_format);
  if (f->nsnaps) {
    printf ("Snapshot list:\n%-9s %-16s %8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
            "VM CLOCK", "ICOUNT");
    for (i = 0; i < f->nsnaps; i++)
      print_snapshot_row (&f->snaps[i]);
  }
  printf ("Format specific information:\n    compat: %s\n    compression type: %s\n",
          h->version >= 3 ? "1.1" : "0.10", h->compression);
  if (h->version >= 3)
    printf ("    lazy refcounts: %s\n", yes_no (h->lazy_refcounts));
  print_bitmaps (f);
  printf ("    refcount bits: %u\n", h->refcount_bits);
  if (h->data_file)
    printf ("    data file: %s\n", h->data_file);
  if (h->encryption)
    printf ("    encrypt:\n        format: %s\n", h->encryption);
  if (h->data_file)
    printf ("    data file raw: %s\n", yes_no (h->data_file_raw));
  if (h->version >= 3)
    printf ("    corrupt: %s\n    extended l2: %s\n", yes_no (h->corrupt),
            yes_no (h->extended_l2));
}

/* An image on a block device: the volume may be reduced to the size
 * shown, once nothing serves the image, and never below it.
 */
static void print_device (struct q2_image *img)
{
  struct q2_stats s;

  q2_get_stats (img, &s);
  if (!s.device_size)
    return;
  printf ("    block device: %" PRIu64 " bytes; the image ends at %" PRIu64 "\n",
          s.device_size, s.file_length);
  printf ("    lvreduce size: %" PRIu64 " bytes (the image's end rounded up to 4 MiB, "
          "LVM's default extent; never reduce below it)\n", s.lvreduce_size);
}

static void print_reclaim_part (const struct facts *f)
{
  const struct q2_check *c = &f->c;
  uint64_t cs = q2_cluster_size (f->img);
  uint32_t i;

  printf ("Reclaim information:\n");
  print_size_bytes ("    file length: ", f->file_size);
  printf ("    allocated clusters: %" PRIu64 "/%" PRIu64 " = %.2f%% (%.2f%% fragmented, "
          "%.2f%% compressed)\n", c->allocated_clusters, c->total_clusters,
          percent (c->allocated_clusters, c->total_clusters),
          percent (c->fragmented_clusters, c->allocated_clusters),
          percent (c->compressed_clusters, c->allocated_clusters));
  printf ("    image end offset: %" PRIu64 "\n", c->image_end_offset);
  if (f->nsnaps) {
    print_size_bytes ("    held by snapshots only: ", c->snapshot_only_clusters * cs);
    for (i = 0; i < f->nsnaps; i++) {
      printf ("        snapshot %s (%s) alone: ", f->snaps[i].id, f->snaps[i].name);
      print_size_bytes ("", c->snapshot_alone[i]);
    }
  }
  /* QEMU looks for a relative name from where it runs; the plugin, as
   * for a backing file, from the image's folder: say which file it is.
   */
  if (f->h.data_path)
    printf ("    data file path: %s\n", f->h.data_path);
  print_size_bytes ("    reclaimable: ", c->reclaimable_bytes);
  print_size_bytes ("    compaction could reach: ", f->compactable);
  print_device (f->img);
  if (f->pinned) {
    print_size_bytes ("    cannot move, past the target: ", f->pinned);
    printf ("        compressed %" PRIu64 ", shared with snapshots %" PRIu64
            ", snapshots' own %" PRIu64 ", referenced by nothing %" PRIu64
            ", persistent bitmaps %" PRIu64 " bytes\n",
            f->k.pinned_compressed, f->k.pinned_shared, f->k.pinned_snapshot,
            f->k.pinned_unreferenced, f->k.pinned_bitmaps);
  }
  if (f->h.write_refusal)
    printf ("    plugin: serves it read-only only: %s\n", f->h.write_refusal);
  else if (f->h.dirty)
    printf ("    plugin: rebuilds its refcounts when it opens it (the dirty bit: lazy "
            "refcounts not written back), then serves it for reading and writing\n");
  else
    printf ("    plugin: serves it for reading and writing\n");
  if (c->corruptions || c->leaks)
    printf ("    consistency: %" PRIu64 " corruptions, %" PRIu64 " leaked clusters "
            "(see qcow2reclaim check)\n", c->corruptions, c->leaks);
}

static void print_json_snapshots (const struct facts *f)
{
  uint32_t i;

  printf ("  \"snapshots\": [");
  for (i = 0; i < f->nsnaps; i++) {
    const struct q2_snapshot *s = &f->snaps[i];
    printf ("%s\n    { \"id\": ", i ? "," : "");
    json_string (s->id);
    printf (", \"name\": ");
    json_string (s->name);
    printf (", \"vm-state-size\": %" PRIu64 ", \"date-sec\": %u, \"date-nsec\": %u, "
            "\"vm-clock-sec\": %" PRIu64 ", \"vm-clock-nsec\": %" PRIu64,
            s->vm_state_size, s->date_sec, s->date_nsec, s->vm_clock_nsec / 1000000000,
            s->vm_clock_nsec % 1000000000);
    if (s->has_icount)
      printf (", \"icount\": %" PRIu64, s->icount);
    printf (", \"held-alone\": %" PRIu64 " }", f->c.snapshot_alone[i]);
  }
  printf ("%s],\n", f->nsnaps ? "\n  " : "");
}

static void print_json_bitmaps (const struct facts *f)
{
  uint32_t i;

  if (!f->nbitmaps)
    return;
  printf ("\"bitmaps\": [");
  for (i = 0; i < f->nbitmaps; i++) {
    const struct q2_bitmap *b = &f->bitmaps[i];
    printf ("%s{ \"flags\": [", i ? ", " : "");
    if (b->in_use)
      printf ("\"in-use\"%s", b->auto_flag ? ", " : "");
    if (b->auto_flag)
      printf ("\"auto\"");
    printf ("], \"name\": ");
    json_string (b->name);
    printf (", \"granularity\": %" PRIu64 " }", b->granularity);
  }
  printf ("], ");
}

static void print_json_format_specific (const struct facts *f)
{
  const struct q2_header_info *h = &f->h;

  printf ("  \"format-specific\": { \"type\": \"qcow2\", \"data\": { \"compat\": \"%s\", "
          "\"compression-type\": \"%s\", ", h->version >= 3 ? "1.1" : "0.10",
          h->compression);
  if (h->version >= 3)
    printf ("\"lazy-refcounts\": %s, ", yes_no (h->lazy_refcounts));
  print_json_bitmaps (f);
  printf ("\"refcount-bits\": %u", h->refcount_bits);
  if (h->data_file) {
    printf (", \"data-file\": ");
    json_string (h->data_file);
    printf (", \"data-file-raw\": %s", yes_no (h->data_file_raw));
  }
  if (h->version >= 3)
    printf (", \"corrupt\": %s, \"extended-l2\": %s", yes_no (h->corrupt),
            yes_no (h->extended_l2));
  printf (" } },\n");
}

/* qemu-img info's members first, with its names, then ours. */
static void print_json (const struct facts *f)
{
  const struct q2_header_info *h = &f->h;
  const struct q2_check *c = &f->c;
  uint64_t cs = q2_cluster_size (f->img);

  printf ("{\n  \"filename\": ");
  json_string (q2_file_name (f->img));
  printf (",\n  \"format\": \"qcow2\",\n  \"virtual-size\": %" PRIu64 ",\n"
          "  \"actual-size\": %" PRIu64 ",\n  \"cluster-size\": %" PRIu64 ",\n",
          q2_virtual_size (f->img), f->host, cs);
  if (h->encryption)
    printf ("  \"encrypted\": true,\n  \"encryption-format\": \"%s\",\n", h->encryption);
  if (h->backing_file) {
    printf ("  \"backing-filename\": ");
    json_string (h->backing_file);
    printf (",\n  \"full-backing-filename\": ");
    json_string (h->backing_path);
    printf (",\n");
  }
  if (h->backing_format) {
    printf ("  \"backing-filename-format\": ");
    json_string (h->backing_format);
    printf (",\n");
  }
  print_json_snapshots (f);
  print_json_format_specific (f);
  printf ("  \"dirty-flag\": %s,\n", yes_no (h->dirty));
  printf ("  \"format-version\": %u,\n  \"file-size\": %" PRIu64 ",\n"
          "  \"host-allocated\": %" PRIu64 ",\n"
          "  \"allocated-clusters\": %" PRIu64 ",\n  \"total-clusters\": %" PRIu64 ",\n"
          "  \"compressed-clusters\": %" PRIu64 ",\n  \"fragmented-clusters\": %" PRIu64 ",\n"
          "  \"image-end-offset\": %" PRIu64 ",\n"
          "  \"snapshot-held\": %" PRIu64 ",\n  \"reclaimable\": %" PRIu64 ",\n"
          "  \"compactable-length\": %" PRIu64 ",\n"
          "  \"pinned\": { \"compressed\": %" PRIu64 ", \"shared\": %" PRIu64
          ", \"snapshot\": %" PRIu64 ", \"unreferenced\": %" PRIu64
          ", \"bitmaps\": %" PRIu64 " },\n",
          h->version, f->file_size, f->host, c->allocated_clusters, c->total_clusters,
          c->compressed_clusters, c->fragmented_clusters, c->image_end_offset,
          c->snapshot_only_clusters * cs, c->reclaimable_bytes, f->compactable,
          f->k.pinned_compressed, f->k.pinned_shared, f->k.pinned_snapshot,
          f->k.pinned_unreferenced, f->k.pinned_bitmaps);
  printf ("  \"plugin\": { \"writable\": %s, \"refusal\": ", yes_no (!h->write_refusal));
  json_string (h->write_refusal);
  printf (" },\n  \"corruptions\": %" PRIu64 ",\n  \"leaks\": %" PRIu64 "\n}", c->corruptions,
          c->leaks);
}

/* One word for the summary: what needs a look first. */
static const char *state (const struct facts *f)
{
  if (f->c.corruptions)
    return "errors";
  if (f->h.write_refusal)
    return "read-only";
  if (f->c.leaks)
    return "leaks";
  return "ok";
}

#define SUMMARY_FMT "%-8s %-8s %-8s %-8s %-8s %-5s %-9s %s\n"

static void print_summary_header (void)
{
  if (!opt.json)
    printf (SUMMARY_FMT, "VIRTUAL", "LENGTH", "ON DISK", "RECLAIM", "COMPACT", "SNAPS",
            "STATE", "IMAGE");
}

static void print_summary (const char *file, const struct facts *f, const char *failed)
{
  char v[HUMAN_SIZE_LEN], l[HUMAN_SIZE_LEN], d[HUMAN_SIZE_LEN], r[HUMAN_SIZE_LEN],
    k[HUMAN_SIZE_LEN], sn[16];

  if (failed && !opt.json)
    printf (SUMMARY_FMT, "-", "-", "-", "-", "-", "-", failed, file);
  else if (!opt.json) {
    snprintf (sn, sizeof sn, "%u", f->nsnaps);
    printf (SUMMARY_FMT, human_size (q2_virtual_size (f->img), v),
            human_size (f->file_size, l), human_size (f->host, d),
            human_size (f->c.reclaimable_bytes, r), human_size (f->compactable, k), sn,
            state (f), file);
  }
  else {
    printf ("{ \"filename\": ");
    json_string (file);
    if (failed) {
      printf (", \"state\": \"%s\", \"error\": ", failed);
      json_string (last_error[0] ? last_error : NULL);
      printf (" }");
      return;
    }
    printf (", \"virtual-size\": %" PRIu64 ", \"file-size\": %" PRIu64
            ", \"actual-size\": %" PRIu64 ", \"reclaimable\": %" PRIu64
            ", \"compactable-length\": %" PRIu64 ", \"snapshot-count\": %u"
            ", \"snapshot-held\": %" PRIu64 ", \"corruptions\": %" PRIu64
            ", \"leaks\": %" PRIu64 ", \"plugin-writable\": %s, \"state\": \"%s\" }",
            q2_virtual_size (f->img), f->file_size, f->host, f->c.reclaimable_bytes,
            f->compactable, f->nsnaps,
            f->c.snapshot_only_clusters * q2_cluster_size (f->img), f->c.corruptions,
            f->c.leaks, yes_no (!f->h.write_refusal), state (f));
  }
}

/* sep goes before anything printed; *printed says something was. */
static int info_one (const char *file, bool summary, const char *sep, bool *printed)
{
  struct q2_image *img;
  struct facts f;
  int r;

  last_error[0] = '\0';
  *printed = false;
  if ((r = tool_open (file, false, &img)) < 0) {
    if (summary) {
      printf ("%s", sep);
      print_summary (file, NULL, open_failure (r));
      *printed = true;
    }
    return 1;
  }
  r = gather (img, &f);
  if (summary || r == 0) {
    printf ("%s", sep);
    *printed = true;
  }
  if (summary)
    print_summary (file, &f, r < 0 ? "failed" : NULL);
  else if (r == 0 && opt.json)
    print_json (&f);
  else if (r == 0) {
    print_qemu_part (&f);
    print_reclaim_part (&f);
  }
  release (&f);
  q2_close (img);
  return r < 0 ? 1 : 0;
}

int cmd_info (int nfiles, char **files, bool summary)
{
  /* JSON: an object for one image, an array for several or a summary. */
  bool array = opt.json && (nfiles > 1 || summary);
  bool printed;
  int i, shown = 0, rc = 0;

  q2_set_logger (logger);
  if (summary)
    print_summary_header ();
  if (array)
    printf ("[");
  for (i = 0; i < nfiles; i++) {
    const char *sep = !shown ? (array ? "\n" : "")
      : opt.json ? ",\n" : summary ? "" : "\n";
    rc |= info_one (files[i], summary, sep, &printed);
    shown += printed;
  }
  if (array)
    printf ("\n]");
  if (opt.json && (array || shown))
    printf ("\n");
  return rc;
}
