/**
 * The `fleet` section (SPEC §16): where the fleet's shared state lives in etcd.
 */
import { toMs } from './duration.js'
import type { ResolvedInput } from './schema.js'
import type { FleetConfig } from './types.js'
import { readTlsFilesSync } from './tls-files.js'

export function fleetConfig (input: ResolvedInput['fleet'], resolvePath: (path: string) => string, problems: string[]): FleetConfig | null {
  if (input === undefined) return null
  const { etcd } = input
  if ((etcd.username === undefined) !== (etcd.password === undefined)) problems.push('fleet.etcd.password: username and password go together')
  const tls = etcd.tls
  if (tls !== undefined && (tls.cert === undefined) !== (tls.key === undefined)) problems.push('fleet.etcd.tls.key: cert and key go together')
  const tlsPaths = tls === undefined
    ? null
    : { ca: tls.ca === undefined ? null : resolvePath(tls.ca), cert: tls.cert === undefined ? null : resolvePath(tls.cert), key: tls.key === undefined ? null : resolvePath(tls.key) }
  // Checked with the config, as every other TLS file: a missing or cut file is a problem naming
  // its key at `validate` and at start, not an error from the etcd client once it connects.
  // What was checked is what the client uses (as `tracing.tls.ca`): a file replaced or removed
  // between the check and the client's start cannot reach it unchecked, or fail the start.
  const material = tlsPaths === null ? null : readTlsFilesSync(tlsPaths, 'fleet.etcd.tls', problems)
  const text = (pem: Buffer | undefined): string | null => pem === undefined ? null : pem.toString('utf8')
  const leaseTtlMs = toMs(input.leaseTtl)
  // etcd counts lease TTLs in whole seconds and refuses less than its minimum (about 2 s).
  if (leaseTtlMs < 2000) problems.push('fleet.leaseTtl: at least 2s')
  return {
    etcd: {
      endpoints: etcd.endpoints.map((e) => e.replace(/\/+$/, '')),
      prefix: etcd.prefix,
      username: etcd.username ?? null,
      password: etcd.password ?? null,
      tls: tlsPaths,
      tlsPem: material === null ? null : { ca: text(material.ca), cert: text(material.cert), key: text(material.key) }
    },
    leaseTtlMs
  }
}
