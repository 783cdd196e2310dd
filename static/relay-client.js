/**
 * relay-client.js — stream a chat answer from Chat Relay into a single-page app, token by token.
 *
 * A dependency-free ES module over the relay's server-sent events
 * (`POST /api/stream_chat_completion` with `Accept: text/event-stream`). It parses the events and
 * reports failures; it keeps no conversation and renders nothing — that is the app's job.
 */

/**
 * A failed answer. `code` is the relay's error code (`model_not_allowed`, `rate_limited`,
 * `upstream_timeout`...), or one of this module's own when the relay could not say:
 * `connection_failed` (the network or the relay went away), `incomplete_stream` (the stream ended
 * without its `done` event), `bad_response` (something that is not the relay's format).
 */
export class RelayError extends Error {
  /**
   * @param {string} message a sentence for people
   * @param {{code: string, type?: string | null, status?: number | null, cause?: unknown}} details
   */
  constructor(message, {code, type = null, status = null, cause} = {}) {
    super(message, cause === undefined ? undefined : {cause});
    this.name = "RelayError";
    /** @type {string} */
    this.code = code;
    /** @type {string | null} the OpenAI error type, e.g. "invalid_request_error" */
    this.type = type;
    /** @type {number | null} the HTTP status when the relay refused before streaming; null mid-answer */
    this.status = status;
  }
}

/**
 * Stream one chat completion through the relay, yielding each token (a string) as it arrives.
 *
 * The loop ends normally only when the relay says the answer is complete. Anything else throws:
 * a {@link RelayError} with the relay's error `code` when the relay refuses (HTTP 4xx/5xx) or the
 * answer fails part-way, or `signal.reason` (an `AbortError` by default) when `signal` aborts.
 * Aborting, or leaving the loop early (`break`, `return`, an exception), cancels the request, and
 * the relay then stops the upstream so no more tokens are paid for.
 *
 * @example
 * import {streamChatCompletion} from "/static/relay-client.js";
 * const stop = new AbortController();
 * const messages = [{role: "user", content: "Hello"}];
 * for await (const token of streamChatCompletion({model: "gpt-4o-mini", messages}, {signal: stop.signal}))
 *   output.textContent += token;
 *
 * @param {{model?: string, messages: Array<{role: string, content: unknown}>, [option: string]: unknown}} params
 *   the request body: `model`, `messages` and any option the relay passes on (`temperature`...)
 * @param {{signal?: AbortSignal, baseUrl?: string, token?: string}} [options]
 *   `signal` cancels the answer; `baseUrl` is the relay's origin when it is not this page's
 *   (e.g. "https://relay.example.com"); `token` is sent as `Authorization: Bearer <token>`
 *   for relays that set RELAY_ACCESS_TOKENS
 * @returns {AsyncGenerator<string, void, undefined>}
 */
export async function* streamChatCompletion(params, {signal, baseUrl = "", token} = {}) {
  signal?.throwIfAborted();
  // One controller of our own, so that leaving the loop early can cancel the request too.
  const request = new AbortController();
  const forwardAbort = () => request.abort(signal.reason);
  signal?.addEventListener("abort", forwardAbort, {once: true});
  try {
    const response = await send(params, baseUrl, token, request.signal);
    if (!response.ok) throw await httpError(response, request.signal);
    for await (const event of serverSentEvents(response.body, request.signal)) {
      if (event.type === "message") yield tokenOf(event.data);
      else if (event.type === "error") throw streamError(event.data);
      else if (event.type === "done") return;
    }
    throw new RelayError("The answer was cut off: the relay's stream ended before it was complete.", {
      code: "incomplete_stream",
    });
  } finally {
    signal?.removeEventListener("abort", forwardAbort);
    request.abort();  // a no-op once the body is read; otherwise it hangs up on the relay
  }
}

async function send(params, baseUrl, token, signal) {
  const headers = {"Content-Type": "application/json", "Accept": "text/event-stream"};
  if (token) headers["Authorization"] = `Bearer ${token}`;
  const url = `${baseUrl.replace(/\/+$/, "")}/api/stream_chat_completion`;
  try {
    return await fetch(url, {method: "POST", headers, body: JSON.stringify(params), signal});
  } catch (error) {
    throw connectionError(error, signal);
  }
}

async function httpError(response, signal) {
  const body = await response.text().catch((error) => {
    throw connectionError(error, signal);
  });
  let error;
  try {
    error = JSON.parse(body).error;
  } catch {
    error = null;
  }
  if (!error || typeof error.message !== "string") {
    // Not the relay's own answer: a proxy or load balancer in front of it refused.
    const status = `${response.status} ${response.statusText}`.trim();
    return new RelayError(`The relay answered HTTP ${status} without an error message.`, {
      code: "bad_response",
      status: response.status,
    });
  }
  return new RelayError(error.message, {code: error.code, type: error.type, status: response.status});
}

function streamError(data) {
  const error = parseJson(data).error ?? {};
  return new RelayError(error.message ?? "The answer failed part-way.", {
    code: error.code ?? "bad_response",
    type: error.type,
  });
}

function tokenOf(data) {
  const {content} = parseJson(data);
  if (typeof content !== "string") {
    throw new RelayError("The relay sent a token event without content.", {code: "bad_response"});
  }
  return content;
}

function parseJson(data) {
  try {
    return JSON.parse(data);
  } catch (cause) {
    throw new RelayError("The relay sent an event that is not JSON.", {code: "bad_response", cause});
  }
}

function connectionError(error, signal) {
  if (signal.aborted) return signal.reason;
  return new RelayError(`The connection to the relay failed: ${error.message}`, {
    code: "connection_failed",
    cause: error,
  });
}

/**
 * The events of a server-sent-event body, as {type, data}, parsed as the WHATWG spec says:
 * LF, CR or CRLF line ends (a CRLF may be split between reads), UTF-8 characters split between
 * reads, comments (`: ping`) and blocks without data skipped, an unfinished last event dropped.
 */
async function* serverSentEvents(body, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();  // UTF-8; with {stream: true} it holds a split character back
  let pending = "";
  let type = "";
  let data = [];
  for (;;) {
    const {value, done} = await reader.read().catch((error) => {
      throw connectionError(error, signal);
    });
    if (done) return;
    pending += decoder.decode(value, {stream: true});
    // A CR at the very end may be the first half of a CRLF: keep it until the next read.
    const end = pending.endsWith("\r") ? pending.length - 1 : pending.length;
    const lines = pending.slice(0, end).split(/\r\n|\r|\n/);
    pending = lines.pop() + pending.slice(end);
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield {type: type || "message", data: data.join("\n")};
        type = "";
        data = [];
        continue;
      }
      const [field, fieldValue] = splitField(line);
      if (field === "event") type = fieldValue;
      else if (field === "data") data.push(fieldValue);
    }
  }
}

function splitField(line) {
  const colon = line.indexOf(":");
  if (colon === -1) return [line, ""];
  const value = line.slice(colon + 1);
  return [line.slice(0, colon), value.startsWith(" ") ? value.slice(1) : value];
}
