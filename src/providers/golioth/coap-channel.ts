import { randomBytes, randomInt } from 'node:crypto';
import { generate, parse, type ParsedPacket } from 'coap-packet';
import { ErrorCodes, GatewayError } from '../../errors.js';

/**
 * CoAP requests over one datagram transport (RFC 7252 §4): confirmable requests with message
 * ids and tokens, retransmission with exponential backoff (ACK_TIMEOUT 2 s × a random factor up
 * to 1.5, doubling, MAX_RETRANSMIT 4), piggybacked and separate responses (an empty ACK stops
 * retransmission; a confirmable response is ACKed), RST for a message we cannot place, and
 * NSTART outstanding requests at once (default 1, the RFC's). Framing is `coap-packet`'s.
 *
 * The transport is one DTLS session in production and plain UDP in tests; it is passed in.
 */

export interface DatagramTransport {
  send(datagram: Buffer): void;
  onMessage(handler: (datagram: Buffer) => void): void;
}

export interface CoapRequest {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  /** `/.s/sensors` */
  path: string;
  /** Content-Format number: 50 JSON, 60 CBOR, 42 octet-stream. */
  contentFormat?: number;
  payload?: Buffer;
  signal?: AbortSignal;
}

export interface CoapResponse {
  /** `2.04` */
  code: string;
  payload: Buffer;
  /** Max-Age in seconds, when the response carried one (a 4.29 says when to come back). */
  maxAgeSeconds: number | undefined;
}

export interface CoapChannelOptions {
  ackTimeoutMs?: number;
  ackRandomFactor?: number;
  maxRetransmit?: number;
  /** How long a separate response may take after its empty ACK. */
  responseTimeoutMs?: number;
  nstart?: number;
  /** Largest datagram we send; CoAP over UDP should stay below the path MTU (§3.2 Limits: 1024 B payloads). */
  maxMessageBytes?: number;
}

export interface CoapChannel {
  request(request: CoapRequest): Promise<CoapResponse>;
  /** Rejects every outstanding and queued request with `reason`; later requests reject too. */
  close(reason: Error): void;
  readonly stats: { sent: number; retransmissions: number; responses: number };
}

interface Exchange {
  messageId: number;
  token: Buffer;
  datagram: Buffer;
  acked: boolean;
  retransmits: number;
  timer: NodeJS.Timeout | undefined;
  resolve(response: CoapResponse): void;
  reject(err: Error): void;
  cleanup(): void;
}

const CONTENT_FORMAT = 12;
const MAX_AGE = 14;

function uintOption(value: number): Buffer {
  if (value === 0) return Buffer.alloc(0);
  const bytes: number[] = [];
  for (let v = value; v > 0; v = Math.floor(v / 256)) bytes.unshift(v % 256);
  return Buffer.from(bytes);
}

function readUint(buf: Buffer): number {
  let v = 0;
  for (const b of buf) v = v * 256 + b;
  return v;
}

function optionNumber(name: string | number): number | undefined {
  if (typeof name === 'number') return name;
  if (name === 'Content-Format') return CONTENT_FORMAT;
  if (name === 'Max-Age') return MAX_AGE;
  return undefined;
}

export function createCoapChannel(
  transport: DatagramTransport,
  options: CoapChannelOptions = {},
): CoapChannel {
  const ackTimeoutMs = options.ackTimeoutMs ?? 2000;
  const ackRandomFactor = options.ackRandomFactor ?? 1.5;
  const maxRetransmit = options.maxRetransmit ?? 4;
  const responseTimeoutMs = options.responseTimeoutMs ?? 30_000;
  const nstart = options.nstart ?? 1;
  const maxMessageBytes = options.maxMessageBytes ?? 1152;
  const stats = { sent: 0, retransmissions: 0, responses: 0 };

  let nextMessageId = randomInt(0, 65536);
  const byMessageId = new Map<number, Exchange>();
  const byToken = new Map<string, Exchange>();
  const waiting: (() => void)[] = [];
  let active = 0;
  let closedWith: Error | undefined;

  const sendRaw = (datagram: Buffer) => {
    stats.sent++;
    transport.send(datagram);
  };

  // A finished request hands its slot straight to the next queued one, so NSTART holds.
  const release = () => {
    const next = waiting.shift();
    if (next !== undefined) next();
    else active--;
  };

  const settle = (exchange: Exchange) => {
    if (exchange.timer !== undefined) clearTimeout(exchange.timer);
    exchange.timer = undefined;
    byMessageId.delete(exchange.messageId);
    byToken.delete(exchange.token.toString('hex'));
    exchange.cleanup();
  };

  transport.onMessage((datagram) => {
    let packet: ParsedPacket;
    try {
      packet = parse(datagram);
    } catch {
      return; // not CoAP: nothing to answer
    }
    const isEmpty = packet.code === '0.00';
    if (packet.ack || packet.reset) {
      const exchange = byMessageId.get(packet.messageId);
      if (exchange === undefined) return; // a late or duplicate ACK
      if (packet.reset) {
        settle(exchange);
        exchange.reject(
          new GatewayError(ErrorCodes.PROVIDER_REJECTED, 'the CoAP server reset the request (RST)', {
            retryable: true,
          }),
        );
        return;
      }
      if (isEmpty) {
        // Separate response follows: stop retransmitting, wait for it by token.
        exchange.acked = true;
        byMessageId.delete(exchange.messageId);
        if (exchange.timer !== undefined) clearTimeout(exchange.timer);
        exchange.timer = setTimeout(() => {
          settle(exchange);
          exchange.reject(timeoutError('no separate response arrived after the ACK'));
        }, responseTimeoutMs);
        return;
      }
      deliver(exchange, packet);
      return;
    }
    // A request or a separate response from the server.
    const exchange = byToken.get(packet.token.toString('hex'));
    if (packet.confirmable) {
      const reply = exchange === undefined || isEmpty ? { reset: true } : { ack: true };
      sendRaw(generate({ code: '0.00', messageId: packet.messageId, token: Buffer.alloc(0), ...reply }));
    }
    if (exchange !== undefined && !isEmpty) deliver(exchange, packet);
  });

  function deliver(exchange: Exchange, packet: ParsedPacket) {
    stats.responses++;
    settle(exchange);
    const maxAge = packet.options.find((o) => optionNumber(o.name) === MAX_AGE);
    exchange.resolve({
      code: packet.code,
      payload: packet.payload,
      maxAgeSeconds: maxAge === undefined ? undefined : readUint(maxAge.value),
    });
  }

  function timeoutError(message: string) {
    return new GatewayError(ErrorCodes.PROVIDER_TIMEOUT, message, { retryable: true });
  }

  function arm(exchange: Exchange, timeoutMs: number) {
    exchange.timer = setTimeout(() => {
      if (exchange.retransmits >= maxRetransmit) {
        // The peer is gone or has lost our session: fail this request and everything queued
        // behind it rather than send the queued ones first (that would reorder a device's data).
        close(
          timeoutError(
            `the CoAP server did not acknowledge the request after ${maxRetransmit + 1} transmissions`,
          ),
        );
        return;
      }
      exchange.retransmits++;
      stats.retransmissions++;
      sendRaw(exchange.datagram);
      arm(exchange, timeoutMs * 2);
    }, timeoutMs);
  }

  async function request(req: CoapRequest): Promise<CoapResponse> {
    if (closedWith !== undefined) throw closedWith;
    req.signal?.throwIfAborted();
    const coapOptions = req.path
      .split('/')
      .filter((s) => s.length > 0)
      .map((seg) => ({ name: 'Uri-Path' as const, value: Buffer.from(seg) }));
    const messageId = nextMessageId;
    nextMessageId = (nextMessageId + 1) % 65536;
    const token = randomBytes(4);
    const datagram = generate(
      {
        code: req.method,
        messageId,
        token,
        confirmable: true,
        options: [
          ...coapOptions,
          ...(req.contentFormat === undefined
            ? []
            : [{ name: 'Content-Format' as const, value: uintOption(req.contentFormat) }]),
        ],
        payload: req.payload ?? Buffer.alloc(0),
      },
      maxMessageBytes,
    );

    if (active >= nstart) {
      await new Promise<void>((resolve, reject) => {
        const go = () => {
          req.signal?.removeEventListener('abort', onAbort);
          resolve();
        };
        const onAbort = () => {
          const i = waiting.indexOf(go);
          if (i >= 0) waiting.splice(i, 1);
          reject(req.signal!.reason);
        };
        req.signal?.addEventListener('abort', onAbort, { once: true });
        waiting.push(go);
      });
      if (closedWith !== undefined) {
        release();
        throw closedWith;
      }
    } else {
      active++;
    }
    return new Promise<CoapResponse>((resolve, reject) => {
      const onAbort = () => {
        settle(exchange);
        reject(req.signal!.reason);
      };
      const exchange: Exchange = {
        messageId,
        token,
        datagram,
        acked: false,
        retransmits: 0,
        timer: undefined,
        resolve,
        reject,
        cleanup: () => {
          req.signal?.removeEventListener('abort', onAbort);
          release();
        },
      };
      req.signal?.addEventListener('abort', onAbort, { once: true });
      byMessageId.set(messageId, exchange);
      byToken.set(token.toString('hex'), exchange);
      sendRaw(datagram);
      arm(exchange, ackTimeoutMs * (1 + Math.random() * (ackRandomFactor - 1)));
    });
  }

  function close(reason: Error) {
    if (closedWith !== undefined) return;
    closedWith = reason;
    const exchanges = new Set([...byMessageId.values(), ...byToken.values()]);
    for (const e of exchanges) {
      settle(e);
      e.reject(reason);
    }
    // Queued requests wake up one after another, see closedWith and reject.
    if (waiting.length > 0) release();
  }

  return { request, stats, close };
}
