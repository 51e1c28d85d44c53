/**
 * A real etcd (Debian package `etcd-server`; `.ci/run` installs it when missing) for a test:
 * one or three members on loopback ports, each in a temp data dir, stopped in teardown
 * (SIGTERM, then SIGKILL). A missing binary is a failure with the install command, never a skip.
 */
import type { Test } from 'tap'
import { startLocalEtcd, type LocalEtcd, type LocalEtcdOptions } from '../../src/fleet/local.js'

export type EtcdCluster = LocalEtcd

/** Start a `size`-member cluster; with `start: false` it is laid out (ports, dirs) but not started. */
export async function startEtcd (t: Test, size: 1 | 3 = 1, options: LocalEtcdOptions = {}): Promise<EtcdCluster> {
  const etcd = await startLocalEtcd(size, options)
  t.teardown(etcd.close)
  return etcd
}
