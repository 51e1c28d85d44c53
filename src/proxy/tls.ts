/**
 * TLS on the data plane (SPEC §18). A TLS listener's certificate files are watched by polling
 * `stat` (which follows symlinks, so a Kubernetes Secret volume's symlink swap is seen, like a
 * file rewritten in place), and a changed pair is applied with `setSecureContext` once two
 * checks in a row see it the same: connections already open keep the certificate they shook
 * hands with, new ones get the new one, nothing is dropped. A new pair that does not load
 * (missing file, key not matching) is refused with an error log and a counter; the running
 * certificate stays (Envoy's SDS does the same).
 *
 * `https://` upstreams are connected to with the options of `upstreamConnect`; their CA and
 * client certificate files are watched the same way (`UpstreamCertificates`).
 */
import { statSync } from 'node:fs'
import { stat } from 'node:fs/promises'
import { X509Certificate } from 'node:crypto'
import { createSecureContext, type Server as TlsServer } from 'node:tls'
import type { Logger } from 'pino'
import { buildConnector } from '../undici.js'
import { fileStamp } from '../config/file-stamp.js'
import type { Listener, ListenerTlsConfig, UpstreamConfig, UpstreamTlsConfig } from '../config/types.js'
import { readTlsFiles, readTlsFilesSync, validityProblem, type TlsFilePaths, type TlsMaterial } from '../config/tls-files.js'

/** How often a TLS listener's certificate files are checked for a change. */
export const CERT_POLL_MS = 1000

/** What a TLS listener counts (exported as `breakwater_tls_*` metrics). */
export interface ListenerTlsStats {
  listener: Listener
  reloads: { ok: number, failed: number }
  /** Connections whose handshake failed (no or a bad client certificate, a plain-HTTP client, …). */
  handshakeFailures: number
}

/** The listener's certificate material now, or an error naming the key (start-up). */
export function listenerTlsOptions (config: ListenerTlsConfig, at: string): TlsMaterial & { requestCert: boolean, rejectUnauthorized: boolean } {
  const problems: string[] = []
  const material = readTlsFilesSync(config, at, problems)
  if (material === null) throw new Error(problems.join('; '))
  // Mutual TLS: ask for a client certificate and refuse the handshake without a valid one.
  return { ...material, requestCert: config.requestClientCert, rejectUnauthorized: config.requestClientCert }
}

/**
 * Polls certificate files and hands a changed, sound set to `apply`. A set that does not load
 * (missing file, key not matching) is refused with an error log; what runs stays.
 */
abstract class CertificateFiles {
  private timer: NodeJS.Timeout | null = null
  /** The files as last applied (or refused). */
  private last: string
  /** The files as the previous check saw them. */
  private seen: string
  private polling = false

  constructor (private readonly files: TlsFilePaths, private readonly at: string, protected readonly logger: Logger, private readonly intervalMs: number) {
    this.last = this.paths().map((p) => { try { return fileStamp(statSync(p)) } catch { return fileStamp(null) } }).join('|')
    this.seen = this.last
  }

  private paths (): string[] {
    const { cert, key, ca } = this.files
    return [cert, key, ca].filter((p): p is string => p !== null)
  }

  /** Who the log lines are about (`{listener}` or `{upstream}`). */
  protected abstract readonly subject: Record<string, string>
  /** Put sound new material in force; throws when it cannot be. */
  protected abstract apply (material: TlsMaterial): void
  protected abstract counted (ok: boolean): void

  start (): void {
    if (this.timer !== null) return
    this.timer = setInterval(() => { void this.poll() }, this.intervalMs)
    this.timer.unref()
  }

  stop (): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }

  /** One check; exported for reload, which re-checks at once. */
  async poll (): Promise<void> {
    if (this.polling) return
    this.polling = true
    try {
      const print = (await Promise.all(this.paths().map(async (p) => fileStamp(await stat(p).catch(() => null))))).join('|')
      const before = this.seen
      this.seen = print
      if (print === this.last) return
      // Read once two checks in a row see the files the same: one still being written (a CA
      // bundle half copied, a certificate without its new key yet) is never applied half done.
      if (print !== before) return
      // Remembered even when the new files are refused: a pair that does not match is refused
      // once, and loads at the next change, without an error per poll.
      this.last = print
      const problems: string[] = []
      const material = await readTlsFiles(this.files, this.at, problems)
      // A certificate out of its validity would fail every client that verifies it: the running one stays.
      const invalid = material?.cert === undefined ? null : validityProblem(material.cert, this.at, this.files.cert ?? '')
      if (invalid !== null) problems.push(`${invalid}; clients that verify it would refuse every new connection`)
      else if (material !== null) {
        try {
          this.apply(material)
        } catch (err) {
          problems.push(`${this.at}: ${(err as Error).message}`)
        }
      }
      if (problems.length > 0) {
        this.counted(false)
        this.logger.error({ event: 'tls_reload', ...this.subject, result: 'refused', problems }, 'new certificate files refused; the running certificate is kept')
        return
      }
      this.counted(true)
      const cert = material?.cert === undefined ? null : new X509Certificate(material.cert)
      this.logger.info({ event: 'tls_reload', ...this.subject, result: 'ok', ...(cert !== null ? { serialNumber: cert.serialNumber, validTo: cert.validTo } : {}) }, 'certificate reloaded')
    } finally {
      this.polling = false
    }
  }
}

/** Re-reads a TLS listener's certificate files when they change and applies a good new pair. */
export class CertificateWatcher extends CertificateFiles {
  protected readonly subject: Record<string, string>

  constructor (private readonly server: TlsServer, config: ListenerTlsConfig, private readonly stats: ListenerTlsStats, logger: Logger, intervalMs = CERT_POLL_MS) {
    super(config, `listen.${stats.listener}.tls`, logger, intervalMs)
    this.subject = { listener: stats.listener }
  }

  protected apply (material: TlsMaterial): void {
    this.server.setSecureContext(material)
  }

  protected counted (ok: boolean): void {
    if (ok) this.stats.reloads.ok++
    else this.stats.reloads.failed++
  }
}

/**
 * An `https://` upstream's CA and client certificate (SPEC §18), re-read when the files change
 * like a listener's: connections already open keep what they shook hands with, new ones use
 * the new files, so a rotated client certificate (cert-manager, SPIFFE) never needs a reload.
 */
export class UpstreamCertificates extends CertificateFiles {
  protected readonly subject: Record<string, string>
  /** Changed files re-read, by result (`breakwater_upstream_tls_certificate_reloads_total`). */
  readonly reloads = { ok: 0, failed: 0 }
  private connector: buildConnector.connector
  /** undici's `connect` for the upstream's pools: always the current files. */
  readonly connect: buildConnector.connector = (options, callback) => { this.connector(options, callback) }

  constructor (private readonly config: UpstreamConfig, material: TlsMaterial, logger: Logger, intervalMs = CERT_POLL_MS) {
    super(config.tls as UpstreamTlsConfig, `upstreams.${config.name}.tls`, logger, intervalMs)
    this.subject = { upstream: config.name }
    this.connector = this.build(material)
  }

  private build (material: TlsMaterial): buildConnector.connector {
    const tls = this.config.tls as UpstreamTlsConfig
    return buildConnector({
      timeout: this.config.connectTimeoutMs,
      ...material,
      rejectUnauthorized: tls.rejectUnauthorized,
      ...(tls.servername !== null ? { servername: tls.servername } : {})
    })
  }

  protected apply (material: TlsMaterial): void {
    createSecureContext(material) // a pair Node would refuse is refused here, not at the next connection
    this.connector = this.build(material)
  }

  // Counted as a listener's are: a refused rotation leaves the old client certificate in use
  // until it expires, and an alert needs a series to see that, not only an error line.
  protected counted (ok: boolean): void {
    if (ok) this.reloads.ok++
    else this.reloads.failed++
  }
}

/**
 * undici `connect` options for an upstream's endpoints: the connect timeout and, for an
 * `https://` upstream with `tls`, its CA, client certificate and server name, kept current by
 * the upstream's `UpstreamCertificates` (started by the caller; a file gone since the config
 * build checked it fails the start-up or the reload, naming the key).
 */
export function upstreamConnect (config: UpstreamConfig, logger: Logger): { connect: Record<string, unknown> | buildConnector.connector, certificates: UpstreamCertificates | null } {
  const tls = config.tls
  if (tls === null) return { connect: { timeout: config.connectTimeoutMs }, certificates: null }
  const problems: string[] = []
  const material = readTlsFilesSync(tls, `upstreams.${config.name}.tls`, problems)
  if (material === null) throw new Error(problems.join('; '))
  const certificates = new UpstreamCertificates(config, material, logger)
  return { connect: certificates.connect, certificates }
}
