import FaultlineCore

/// What one decoding of a stream produced: each message or error with the stream bytes
/// the decoder consumed for it, then what `finish()` said. Two runs over the same stream
/// must be equal whatever the chunking.
struct DecodeRun: Equatable, CustomStringConvertible {
    struct Step: Equatable, CustomStringConvertible {
        var result: Result<WireMessage, WireError>
        /// The stream bytes consumed by this step (empty for a sticky error).
        var frame: Range<Int>

        var description: String { "\(frame): \(result)" }
    }

    var steps: [Step] = []
    /// The sticky error that stopped decoding, if any.
    var stuck: WireError?
    var finished: WireError?

    var description: String { "\(steps) stuck: \(String(describing: stuck)) finish: \(String(describing: finished))" }

    /// The stream handed over in one piece.
    static func whole(_ stream: UnsafeRawBufferPointer) -> DecodeRun {
        var decoder = WireDecoder()
        var run = DecodeRun()
        decoder.append(stream)
        run.drain(&decoder, fed: stream.count)
        run.finish(decoder)
        return run
    }

    /// The stream in chunks, draining the decoder after each one, as a socket receiver
    /// does. Decoded messages are kept while more bytes arrive (page batches share the
    /// decoder's buffer, which must then be copied, not overwritten).
    static func chunked(_ stream: UnsafeRawBufferPointer, plan: FeedPlan) -> DecodeRun {
        var plan = plan
        var decoder = WireDecoder()
        var run = DecodeRun()
        var fed = 0
        var chunk = 0
        while fed < stream.count {
            let size = min(plan.nextChunkSize(), stream.count - fed)
            let piece = UnsafeRawBufferPointer(rebasing: stream[fed..<fed + size])
            switch plan.flavour(ofChunk: chunk) {
            case .rawBuffer:
                decoder.append(piece)
            case .array:
                decoder.append(Array(piece))
            case .fill:
                let written = decoder.append(upTo: size + 4096) { window in
                    window.copyMemory(from: piece)
                    return size
                }
                guard written == size else { fatalError("append(upTo:) reported \(written) of \(size) bytes") }
            }
            fed += size
            chunk += 1
            run.drain(&decoder, fed: fed)
        }
        run.finish(decoder)
        return run
    }

    /// Takes every complete message out of `decoder`, which has been fed `fed` bytes.
    private mutating func drain(_ decoder: inout WireDecoder, fed: Int) {
        if let stuck {
            expectSticky(&decoder, stuck)
            return
        }
        while true {
            let start = fed - decoder.bufferedByteCount
            do {
                guard let message = try decoder.nextMessage() else {
                    guard fed - decoder.bufferedByteCount == start else { fatalError("nil from nextMessage() consumed bytes") }
                    return
                }
                steps.append(Step(result: .success(message), frame: start..<fed - decoder.bufferedByteCount))
            } catch {
                let end = fed - decoder.bufferedByteCount
                steps.append(Step(result: .failure(error), frame: start..<end))
                if error.leavesStreamInSync {
                    guard end - start >= 20 else { fatalError("in-sync error \(error) consumed \(end - start) bytes, not a frame") }
                } else {
                    guard end == start else { fatalError("sticky error \(error) consumed \(end - start) bytes") }
                    stuck = error
                    expectSticky(&decoder, error)
                    return
                }
            }
        }
    }

    private func expectSticky(_ decoder: inout WireDecoder, _ error: WireError) {
        do {
            let message = try decoder.nextMessage()
            fatalError("after sticky \(error), nextMessage() returned \(String(describing: message))")
        } catch let again {
            guard again == error else { fatalError("sticky \(error) became \(again)") }
        }
    }

    private mutating func finish(_ decoder: WireDecoder) {
        do {
            try decoder.finish()
            guard stuck == nil, decoder.bufferedByteCount == 0 else {
                fatalError("finish() accepted a stream that is stuck or has \(decoder.bufferedByteCount) bytes left")
            }
        } catch {
            finished = error
            let expected = stuck ?? .truncated(bufferedBytes: decoder.bufferedByteCount)
            guard error == expected, stuck != nil || decoder.bufferedByteCount > 0 else {
                fatalError("finish() threw \(error), expected \(expected)")
            }
        }
    }
}
