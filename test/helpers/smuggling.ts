/**
 * Request-smuggling variants (CL.TE, TE.CL, TE.TE obfuscations, malformed lengths and chunks,
 * bad line endings, control bytes) with the verdict each must get through a real socket:
 * `refused` (400 and the connection closed, the upstream sees nothing), or the requests the
 * upstream must see — method, path and body exactly as the client framed them, nothing more.
 */

export type Verdict = 'refused' | string[]

export interface SmugglingCase {
  name: string
  bytes: string
  verdict: Verdict
}

const head = (lines: string[]): string => lines.join('\r\n') + '\r\n\r\n'
const post = (...headers: string[]): string => head(['POST /a HTTP/1.1', 'Host: a', ...headers])
const get = (...headers: string[]): string => head(['GET /a HTTP/1.1', 'Host: a', ...headers])
const HELLO = '5\r\nhello\r\n0\r\n\r\n'
const chunked = (body: string): string => post('Transfer-Encoding: chunked') + body
const refused = (name: string, bytes: string): SmugglingCase => ({ name, bytes, verdict: 'refused' })
const framed = (name: string, bytes: string, ...seen: string[]): SmugglingCase => ({ name, bytes, verdict: seen })

export const SMUGGLING_CASES: SmugglingCase[] = [
  // CL.TE and TE.CL: both framings present, in either order.
  refused('CL.TE with a smuggled prefix', post('Content-Length: 6', 'Transfer-Encoding: chunked') + '0\r\n\r\nG'),
  refused('TE.CL', post('Transfer-Encoding: chunked', 'Content-Length: 3') + HELLO),
  refused('TE chunked with Content-Length: 0', post('Transfer-Encoding: chunked', 'Content-Length: 0') + '0\r\n\r\n'),
  refused('CL.TE with a smuggled request', post('Content-Length: 44', 'Transfer-Encoding: chunked') + '0\r\n\r\n' + get()),
  // TE.TE: obfuscated Transfer-Encoding — refused, or read as plain chunked.
  refused('TE: xchunked', post('Transfer-Encoding: xchunked') + HELLO),
  refused('TE: chunked, identity', post('Transfer-Encoding: chunked, identity') + HELLO),
  refused('TE: chunked, chunked', post('Transfer-Encoding: chunked, chunked') + HELLO),
  refused('TE: gzip alone', post('Transfer-Encoding: gzip') + 'hello'),
  refused('two TE headers, chunked then identity', post('Transfer-Encoding: chunked', 'Transfer-Encoding: identity') + HELLO),
  refused('two TE headers, both chunked', post('Transfer-Encoding: chunked', 'Transfer-Encoding: chunked') + HELLO),
  refused('space before the colon', post('Transfer-Encoding : chunked') + HELLO),
  refused('tab before the colon', post('Transfer-Encoding\t: chunked') + HELLO),
  refused('TE: chunked + vertical tab', post('Transfer-Encoding: chunked\u000b') + HELLO),
  refused('TE by obs-fold', post('Transfer-Encoding:', ' chunked') + HELLO),
  framed('TE: two spaces, chunked', post('Transfer-Encoding:  chunked') + HELLO, 'POST /a hello'),
  framed('TE: chunked, trailing space', post('Transfer-Encoding: chunked ') + HELLO, 'POST /a hello'),
  framed('TE: tab, chunked', post('Transfer-Encoding:\tchunked') + HELLO, 'POST /a hello'),
  framed('TE: Chunked', post('Transfer-Encoding: Chunked') + HELLO, 'POST /a hello'),
  framed('TRANSFER-ENCODING: chunked', post('TRANSFER-ENCODING: chunked') + HELLO, 'POST /a hello'),
  // A coding before chunked cannot be passed on: forwarded, gzip bytes would reach the app as the body.
  refused('TE: identity, chunked', post('Transfer-Encoding: identity, chunked') + HELLO),
  refused('TE: gzip, chunked', post('Transfer-Encoding: gzip, chunked') + HELLO),
  // Content-Length spellings.
  refused('two different Content-Lengths', post('Content-Length: 4', 'Content-Length: 5') + 'hello'),
  refused('the same Content-Length twice', post('Content-Length: 5', 'Content-Length: 5') + 'hello'),
  refused('Content-Length list', post('Content-Length: 5, 5') + 'hello'),
  refused('Content-Length with a trailing comma', post('Content-Length: 5,') + 'hello'),
  refused('Content-Length: +5', post('Content-Length: +5') + 'hello'),
  refused('Content-Length: -1', post('Content-Length: -1') + 'hello'),
  refused('Content-Length in hex', post('Content-Length: 0x5') + 'hello'),
  refused('Content-Length with a space inside', post('Content-Length: 5 5') + 'hello'),
  refused('empty Content-Length', post('Content-Length: ') + 'hello'),
  refused('Content-Length past 2^64', post('Content-Length: 99999999999999999999') + 'hello'),
  framed('Content-Length with leading zeros', post('Content-Length: 005') + 'hello', 'POST /a hello'),
  // Chunk sizes and extensions.
  refused('chunk size not hex', chunked('zz\r\nabc\r\n0\r\n\r\n')),
  refused('chunk size past 2^64', chunked('ffffffffffffffffff\r\nabc\r\n0\r\n\r\n')),
  refused('negative chunk size', chunked('-5\r\nhello\r\n0\r\n\r\n')),
  refused('chunk size 0x5', chunked('0x5\r\nhello\r\n0\r\n\r\n')),
  refused('space after the chunk size', chunked('5 \r\nhello\r\n0\r\n\r\n')),
  refused('chunk data longer than its size', chunked('3\r\nhello\r\n0\r\n\r\n')),
  refused('chunk lines ending in bare LF', chunked('5\nhello\n0\n\n')),
  framed('chunk extension', chunked('5;ext=1\r\nhello\r\n0\r\n\r\n'), 'POST /a hello'),
  framed('quoted chunk extension', chunked('5;a="b c"\r\nhello\r\n0\r\n\r\n'), 'POST /a hello'),
  framed('chunk size with leading zeros', chunked('005\r\nhello\r\n0\r\n\r\n'), 'POST /a hello'),
  framed('trailer after the last chunk', chunked('5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n'), 'POST /a hello'),
  // Line endings and control bytes.
  refused('request ending in bare LF', 'GET /a HTTP/1.1\nHost: a\n\n'),
  refused('a header line ending in bare LF', 'GET /a HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n'),
  refused('lines ending in bare CR', 'GET /a HTTP/1.1\rHost: a\r\r'),
  refused('NUL in a header value', get('X-A: b\u0000c')),
  refused('NUL in a header name', get('X-\u0000A: b')),
  refused('NUL in the target', head(['GET /a\u0000b HTTP/1.1', 'Host: a'])),
  refused('CR in a header value', get('X-A: b\rc')),
  refused('obs-fold in another header', get('X-A: b', ' c')),
  refused('space in a header name', get('X A: b')),
  refused('empty header name', get(': b')),
  refused('header line without a colon', get('Foo')),
  refused('lowercase version', head(['GET /a http/1.1', 'Host: a'])),
  // RFC 9110 §15.6.6, §2.5: another major version on an HTTP/1 request line is not HTTP/1.1
  // (Node's parser takes HTTP/2.0 and HTTP/0.9 and refuses the rest itself).
  refused('HTTP/2.0 on an HTTP/1 request line', head(['GET /a HTTP/2.0', 'Host: a'])),
  refused('HTTP/2.0 with a body', head(['POST /a HTTP/2.0', 'Host: a', 'Content-Length: 5']) + 'hello'),
  refused('HTTP/0.9 with headers', head(['GET /a HTTP/0.9', 'Host: a'])),
  refused('HTTP/3.0', head(['GET /a HTTP/3.0', 'Host: a'])),
  refused('HTTP/1.2', head(['GET /a HTTP/1.2', 'Host: a'])),
  // RFC 9112 §3: a request line may be parsed on whitespace-separated words.
  framed('two spaces after the method', head(['GET  /a HTTP/1.1', 'Host: a']), 'GET /a '),
  // Bodies and pipelining framed as written.
  framed('GET with a Content-Length body', get('Content-Length: 5') + 'hello', 'GET /a hello'),
  framed('GET with a chunked body', get('Transfer-Encoding: chunked') + HELLO, 'GET /a hello'),
  framed('two pipelined POSTs', post('Content-Length: 5') + 'hello' + post('Content-Length: 3') + 'bye', 'POST /a hello', 'POST /a bye'),
  framed('Content-Length: 0 then a pipelined GET', post('Content-Length: 0') + head(['GET /b HTTP/1.1', 'Host: a']), 'POST /a ', 'GET /b '),
  framed('chunked then a pipelined GET', chunked(HELLO) + head(['GET /b HTTP/1.1', 'Host: a']), 'POST /a hello', 'GET /b '),
  // RFC 9112 §6.1: HTTP/1.0 with Transfer-Encoding is processed, then the connection closed.
  framed('chunked on HTTP/1.0', head(['POST /a HTTP/1.0', 'Host: a', 'Transfer-Encoding: chunked']) + HELLO, 'POST /a hello'),
  framed('HTTP/1.0 with Content-Length', head(['POST /a HTTP/1.0', 'Host: a', 'Content-Length: 5']) + 'hello', 'POST /a hello')
]
